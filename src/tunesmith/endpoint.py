"""The one client for OpenAI-compatible chat endpoints (OpenAI, vLLM, Ollama, tunesmith serve), on the
official `openai` package: the synth generator, the judge and the endpoint systems of eval all talk through
`ChatClient`.

Retries (408/409/429/5xx, timeouts, refused connections; exponential backoff with jitter, honouring
Retry-After) and timeouts are the `openai` client's own. What we add: the key is read only from the
configured environment variable, and every failure a user can fix becomes one line naming the config key
(`where`) to change. `EndpointFailed` marks the failures that might pass if asked again later (the endpoint
is overloaded or down). `chat_many` keeps several requests in flight over the one client (its connection
pool is shared safely between threads) and returns the replies in the order asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tunesmith.config import UserError
from tunesmith.config.schema import ChatEndpointConfig

# A placeholder the `openai` client needs when no key is configured; the Authorization header is then left
# out, so a local server never sees a made-up key (and OPENAI_API_KEY is never sent to a server it was not
# meant for).
_NO_KEY = "no-key"


class EndpointFailed(UserError):
    """The endpoint kept failing (429/5xx/timeouts) through every retry: a later call may still succeed."""


@dataclass(frozen=True)
class Reply:
    """One chat completion: the text, the token usage the server reported (None: not reported), latency."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: (
        float  # the request that was answered, without earlier failed tries and the backoff between them
    )
    retries: int  # failed tries before it


def _clip(text: object, n: int = 200) -> str:
    """A server's message on one short line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= n else flat[: n - 3] + "..."


def _omit(openai) -> object:
    """openai's marker that removes a default header (public as `openai.Omit` only in later releases)."""
    if hasattr(openai, "Omit"):
        return openai.Omit()
    from openai._types import Omit  # openai 1.x before the public alias: the same class

    return Omit()


class ChatClient:
    """Chat completions from `model` at `base_url` (".../v1"); `where` is the config section errors name."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        where: str = "endpoint",
    ) -> None:
        try:
            import openai
        except ImportError:
            raise UserError(
                f"{where}: OpenAI-compatible endpoints need the `openai` package "
                "(pip install 'tunesmith[eval]')"
            ) from None
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not key:
            raise UserError(
                f"{where}.api_key_env: environment variable {api_key_env} is not set or empty "
                f"(export {api_key_env}=<key>, or set {where}.api_key_env: null for a server without auth)"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.where, self.timeout_s, self.max_retries = model, where, timeout_s, max_retries
        self.api_key_env = api_key_env
        self._openai = openai
        self._client = openai.OpenAI(
            base_url=base_url, api_key=key or _NO_KEY, timeout=timeout_s, max_retries=max_retries
        )
        self._headers = {} if key else {"Authorization": _omit(openai)}

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Reply:
        """One completion of `messages`; settings left at None (or an empty stop list) are not sent."""
        openai = self._openai
        optional = {"top_p": top_p, "stop": stop or None, "seed": seed}
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                extra_headers=self._headers,
                **{k: v for k, v in optional.items() if v is not None},
            )
            completion = raw.parse()
        except openai.APITimeoutError:  # a subclass of APIConnectionError: caught first
            raise EndpointFailed(
                self._gave_up(f"no answer within {self.timeout_s:g} s", f" or {self.where}.timeout_s")
            ) from None
        except openai.APIConnectionError as e:
            raise UserError(
                f"{self.where}.base_url: cannot connect to {self.url} "
                f"({_clip(e.__cause__ or e)}; is the server running?)"
            ) from None
        except openai.APIStatusError as e:
            raise self._status_error(e) from None
        except openai.APIError as e:  # a 200 whose body is not a chat completion
            raise self._not_chat(e.message) from None
        try:
            choice = completion.choices[0]
            text = choice.message.content or ""  # None: a refusal or a tool call, no text
        except (AttributeError, IndexError, TypeError):  # e.g. an HTML page, or JSON without `choices`
            raise self._not_chat(raw.http_response.text) from None
        usage = getattr(completion, "usage", None)
        return Reply(
            text,
            choice.finish_reason,
            getattr(usage, "prompt_tokens", None),
            getattr(usage, "completion_tokens", None),
            raw.elapsed.total_seconds(),
            getattr(raw, "retries_taken", 0),
        )

    def chat_many(
        self,
        conversations: list[list[dict[str, str]]],
        *,
        concurrency: int,
        max_tokens: int,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        labels: list[str] | None = None,
    ) -> list[Reply]:
        """`chat` over every conversation, `concurrency` requests in flight; replies in the order asked.

        The first failure in that order is raised with its conversation's label (default: its number)
        appended, and the requests not yet sent are cancelled.
        """
        from concurrent.futures import ThreadPoolExecutor

        names = labels or [f"conversation {i + 1}" for i in range(len(conversations))]
        replies: list[Reply] = []
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="chat") as pool:
            futures = [
                pool.submit(self.chat, m, max_tokens=max_tokens, temperature=temperature, stop=stop)
                for m in conversations
            ]
            for future, name in zip(futures, names, strict=True):
                try:
                    replies.append(future.result())
                except BaseException as e:  # re-raised: only stop what has not started (Ctrl-C included)
                    pool.shutdown(wait=False, cancel_futures=True)
                    if isinstance(e, UserError):
                        raise type(e)(f"{e} (asking {_clip(name, 100)})") from None
                    raise
        return replies

    def _gave_up(self, cause: str, knob: str = "") -> str:
        return (
            f"{self.where}: {self.url} failed {self.max_retries + 1} times ({cause}; is the server up? "
            f"raise {self.where}.max_retries{knob})"
        )

    def _status_error(self, e) -> UserError:
        status = e.status_code
        body = e.body if isinstance(e.body, dict) else {}
        # `message`: OpenAI's {"error": {...}} (the client unwraps it); `detail`: a FastAPI HTTPException's
        detail = _clip(body.get("message") or body.get("detail") or e.response.text or e.message)
        if status in (408, 409, 429) or status >= 500:  # the client retried these already
            return EndpointFailed(self._gave_up(f"HTTP {status}: {detail}"))
        if status in (401, 403):
            fix = (
                f"check the key in {self.api_key_env}"
                if self.api_key_env
                else f"set {self.where}.api_key_env to the variable holding the key"
            )
        elif status == 404:
            fix = f"is '{self.model}' served there? check {self.where}.model and {self.where}.base_url"
        else:
            fix = f"check {self.where}.model and the generation settings"
        return UserError(f"{self.where}: {self.url} answered HTTP {status} ({detail}; {fix})")

    def _not_chat(self, body: str) -> UserError:
        return UserError(
            f"{self.where}.base_url: {self.url} did not answer with a chat completion "
            f"({_clip(body) or 'empty body'}; "
            "the base URL of an OpenAI-compatible server usually ends in /v1)"
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chat_client(cfg: ChatEndpointConfig, where: str) -> ChatClient:
    """The client of a section of endpoint fields (eval.judge, eval.endpoints.NAME) that `where` names."""
    return ChatClient(
        cfg.base_url,
        cfg.model,
        api_key_env=cfg.api_key_env,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        where=where,
    )
