"""The OpenAI wire format: request models (validated strictly), response/chunk bodies, error bodies."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.generate import Completion


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        # a message quoting the request may hold lone surrogates ("\ud800" is valid JSON), which no UTF-8
        # body could carry
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # strict: "5" is not an int and 1 is not a bool (wrong types are the client's bug, say so);
    # extra fields are ignored because real clients send ones we do not use (user, logprobs, ...);
    # NaN/Infinity (which Python's json accepts) would turn into NaN probabilities.
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    # logits are divided (or multiplied) by the penalty: far outside this range they overflow to inf
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class CompletionRequest(_Request):
    """POST /v1/completions: raw text continued as is (no template)."""

    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """POST /v1/chat/completions: messages rendered with the model's training template."""

    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": len(c.ids),
        "total_tokens": c.prompt_tokens + len(c.ids),
    }


def completion_body(rid: str, model: str, c: Completion) -> dict:
    """A /v1/completions response."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
        "usage": usage(c),
    }


def chat_body(rid: str, model: str, c: Completion) -> dict:
    """A /v1/chat/completions response."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": usage(c),
    }


def chunk(rid: str, model: str, chat: bool, text: str | None, final: Completion | None = None) -> dict:
    """One SSE chunk: a text delta, or (final given) the finish_reason with usage."""
    finish = final.finish_reason if final is not None else None
    if chat:
        delta = {} if final is not None else {"content": text or ""}
        if text is None and final is None:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        body = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
    if final is not None:
        body["usage"] = usage(final)
    return body


def validation_message(err: dict) -> tuple[str, str]:
    """A pydantic error -> (one-line message, param)."""
    param = ".".join(str(p) for p in err["loc"])
    return f"{param}: {err['msg']}" if param else err["msg"], param
