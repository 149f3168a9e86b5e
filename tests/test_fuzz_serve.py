"""Fuzzing the server in process: any request body, on any endpoint, gets a well-formed answer.

The property: a 2xx with a valid OpenAI body (or a complete SSE stream), or a 4xx with an OpenAI-style error
body - never a 5xx, never an exception out of the app, never a hang (every request runs under a timeout).
"""

import asyncio
import json
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import tiny
from tunesmith.config import Config, GenerateConfig, ServeConfig
from tunesmith.data.formats import get_template
from tunesmith.serve.app import create_app
from tunesmith.serve.scheduler import LoadedModel

CTX = 48  # small context, so prompts and max_tokens run into it


def _app():
    qa, chat = tiny.gpt_neox(max_position_embeddings=CTX), tiny.llama(max_position_embeddings=CTX)
    for m in (qa, chat):
        m.generation_config.eos_token_id = None
    tok = tiny.tokenizer()
    models = {
        "qa": LoadedModel("qa", qa, tok, get_template("qa", "qa")),
        "chat": LoadedModel("chat", chat, tok, get_template("chat", "chat")),
    }
    cfg = Config(
        generate=GenerateConfig(max_new_tokens=4),
        serve=ServeConfig(max_tokens_cap=24, max_request_bytes=3000, max_wait_ms=0),
    )
    return create_app(cfg, models)


APP = _app()

# JSON values of every type, including ones Python's json reads but JSON forbids (NaN, Infinity) and lone
# surrogate escapes ("\ud800"), huge and negative integers
TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)  # any code point, surrogates included
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
VALUES = st.recursive(
    SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3), max_leaves=8
)
ODD_TEXT = (
    st.sampled_from(
        [
            "hi",
            "What was the revenue?",
            "",
            " ",
            "é ü 中 🎉",
            "\ud800",
            "a\udfffb",
            "\x00",
            "<eos>",
            "<|im_start|>system",
        ]
    )
    | TEXT
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | VALUES,
        "content": ODD_TEXT | VALUES,
    }
)
FIELDS = {  # per field: sensible values, edge values and anything at all
    "model": st.sampled_from(["qa", "chat", "gpt-4", "", "\udc80"]) | VALUES,
    "messages": st.lists(MESSAGE, max_size=3) | VALUES,
    "prompt": st.sampled_from(["hello", "", ["hi"], [], ["a", "b"], "hello world " * 30]) | ODD_TEXT | VALUES,
    "max_tokens": st.integers(min_value=-3, max_value=60)
    | st.sampled_from([2**63, 2**80, -(2**80)])
    | VALUES,
    "max_completion_tokens": st.integers(min_value=-3, max_value=60) | VALUES,
    "temperature": st.floats(min_value=0, max_value=2)
    | st.sampled_from([1e-300, 5e-324, 1e-8, 2.0000001])
    | VALUES,
    "top_p": st.floats(min_value=0, max_value=1) | st.sampled_from([1e-300, 5e-324]) | VALUES,
    "top_k": st.integers(min_value=-1, max_value=2**70) | VALUES,
    "repetition_penalty": st.floats(min_value=0, max_value=1e300)
    | st.sampled_from([1e-300, 1e300, 0.01, 100.0])
    | VALUES,
    "stop": st.sampled_from(["e", ["\n", "a"], [], "", ["\ud800"], ["x" * 500]])
    | st.lists(ODD_TEXT, max_size=5)
    | VALUES,
    "seed": st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**64, 2**64 - 1, -(2**63) - 1])
    | VALUES,
    "stream": st.booleans() | VALUES,
    "n": st.integers(min_value=0, max_value=3) | VALUES,
}


@st.composite
def bodies(draw, chat: bool) -> dict:
    """A valid request with up to three fields replaced by anything (and sometimes a required one dropped)."""
    body = {
        "model": draw(st.sampled_from(["qa", "chat"])),
        "max_tokens": draw(st.integers(1, 6)),
        "stream": draw(st.booleans()),
        "temperature": draw(st.sampled_from([0.0, 0.7])),
    }
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hello"}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        body[name] = draw(FIELDS[name])
    for name in draw(st.lists(st.sampled_from(["model", "messages" if chat else "prompt"]), max_size=1)):
        body.pop(name, None)
    return body


RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b'"x"',
            b"\xff\xfe{}",
            b"{" * 300,
            b'{"model": "qa", "prompt": "hi", "max_tokens": NaN}',
        ]
    ),
)
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None])


async def _send(method: str, path: str, content: bytes, ctype: str | None) -> httpx.Response:
    transport = httpx.ASGITransport(app=APP)  # raises anything the app lets escape
    headers = {"content-type": ctype} if ctype else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.wait_for(
            client.request(method, path, content=content, headers=headers), timeout=60
        )


def _quote(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")  # any code point, as URL bytes


def _encode(body: dict) -> bytes:
    return json.dumps(body).encode()  # NaN/Infinity become the bare words; surrogates become \\udxxx escapes


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert (
            isinstance(err["message"], str) and err["message"] and "internal error" not in err["message"]
        ), err
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]", r.text
        payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all("error" not in p and p["choices"][0]["index"] == 0 for p in payloads), r.text
        assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        return
    body = r.json()
    if "choices" in body:
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] <= 24


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), chat=st.booleans(), ctype=CONTENT_TYPES)
def test_any_json_body_gets_an_answer_or_an_openai_error(data, chat, ctype):
    body = data.draw(bodies(chat))
    path = "/v1/chat/completions" if chat else "/v1/completions"
    _check(asyncio.run(_send("POST", path, _encode(body), ctype)))


@settings(max_examples=40, deadline=None)
@given(
    body=st.fixed_dictionaries({}, optional=FIELDS),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
)
def test_any_json_object_gets_an_answer_or_an_openai_error(body, path):
    _check(asyncio.run(_send("POST", path, _encode(body), "application/json")))


@settings(max_examples=30, deadline=None)
@given(raw=RAW, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), ctype=CONTENT_TYPES)
def test_any_bytes_get_an_openai_error(raw, path, ctype):
    _check(asyncio.run(_send("POST", path, raw, ctype)))


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(
        [
            "/v1/models",
            "/v1/models/qa",
            "/v1/models/",
            "/health",
            "/",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1",
            "/v1/embeddings",
        ]
    )
    | TEXT.map(lambda t: "/v1/models/" + _quote(t)),
    raw=RAW,
)
def test_every_endpoint_and_method_answers_cleanly(method, path, raw):
    r = asyncio.run(_send(method, path, raw, "application/json"))
    if path in ("/", "/health") and method == "GET":
        assert r.status_code == 200
    else:
        _check(r)
