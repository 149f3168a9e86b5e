"""serve.engine llama.cpp: the packaged SmolLM2 GGUF (Q4_1) served by llama.cpp through the real app, asked
with the real `openai` client, and checked against llama-cpp-python called directly."""

from __future__ import annotations

import asyncio
import os

import pytest
from fastapi.testclient import TestClient

from tests import tiny
from tunesmith.config import Config, DataConfig, GenerateConfig, ServeConfig, UserError
from tunesmith.model.resolve import packaged_gguf
from tunesmith.serve.app import create_app
from tunesmith.serve.llama_cpp import GgufModel, open_gguf
from tunesmith.serve.models import load_models
from tunesmith.serve.scheduler import LoadedModel

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make` installs it)")
openai = pytest.importorskip("openai")

SHORT = "smollm2-135m-instruct"
CTX = 512
MESSAGES = [
    {"role": "system", "content": "You are a geography teacher. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _cfg(models: dict[str, str]) -> Config:
    return Config(
        data=DataConfig(max_length=CTX),  # set explicitly: the llama.cpp context is this long
        generate=GenerateConfig(max_new_tokens=24),
        serve=ServeConfig(engine="llama.cpp", models=models, max_tokens_cap=CTX, max_wait_ms=0),
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The shipped GGUF under llama.cpp beside a tiny HF model on tunesmith's engine, in one server."""
    tiny_dir = tiny.save_model_dir(tmp_path_factory.mktemp("hf") / "tiny")
    cfg = _cfg({"shipped": SHORT, "tiny": str(tiny_dir)})
    models = load_models(cfg, dict(cfg.serve.models))
    with TestClient(create_app(cfg, models)) as http:
        # TestClient is an httpx.Client: the openai client talks to the app in-process
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0
        )
        yield http, client, models


@pytest.fixture(scope="module")
def direct():
    """llama-cpp-python on its own, as a user of the shipped file would call it (AMX repacking off where the
    CPU has AMX: serve/llama_cpp.open_gguf says why)."""
    return open_gguf(packaged_gguf(SHORT), CTX, os.cpu_count() or 1)


def test_engines_side_by_side_in_models_and_playground(served):
    http, client, models = served
    assert isinstance(models["shipped"], GgufModel) and isinstance(models["tiny"], LoadedModel)
    assert models["shipped"].context_len == CTX
    listed = {m.id: m.owned_by for m in client.models.list().data}
    assert listed == {"shipped": "llama.cpp", "tiny": "tunesmith"}
    assert client.models.retrieve("shipped").owned_by == "llama.cpp"
    html = http.get("/").text
    assert '"models": ["shipped", "tiny"]' in html  # the playground offers both
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES[1:], max_tokens=4)
    assert answer.usage.completion_tokens == 4  # the HF model still answers on our engine


def test_greedy_chat_equals_create_chat_completion(served, direct):
    _, client, _ = served
    reply = client.chat.completions.create(model="shipped", messages=MESSAGES, temperature=0, max_tokens=40)
    # what our engine maps the request to: greedy, no repetition penalty (create_chat_completion: 1.1)
    ref = direct.create_chat_completion(messages=MESSAGES, temperature=0, max_tokens=40, repeat_penalty=1.0)
    text = reply.choices[0].message.content
    print(f"\nllama.cpp via tunesmith serve: {text!r}")
    assert text and text == ref["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert reply.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_stop_and_raw_completion(served, direct):
    _, client, _ = served
    whole = client.chat.completions.create(model="shipped", messages=MESSAGES, temperature=0, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="shipped", messages=MESSAGES, temperature=0, max_tokens=12, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # a stop string from the request cuts the answer before it, as on our engine
    stop = text[4:7]
    cut = client.chat.completions.create(
        model="shipped", messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # /v1/completions continues raw text exactly as llama-cpp-python's create_completion does
    prompt = "The three primary colours are"
    raw = client.completions.create(model="shipped", prompt=prompt, temperature=0, max_tokens=10)
    ref = direct.create_completion(prompt, temperature=0, max_tokens=10, repeat_penalty=1.0)
    assert raw.choices[0].text == ref["choices"][0]["text"]
    assert raw.usage.prompt_tokens == ref["usage"]["prompt_tokens"]


def test_errors_are_openai_shaped(served):
    _, client, _ = served
    with pytest.raises(openai.BadRequestError) as e:  # 30-odd prompt tokens + 500 > the 512-token context
        client.chat.completions.create(model="shipped", messages=MESSAGES, max_tokens=500)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)


def test_requests_to_one_gguf_run_one_at_a_time(served):
    gguf = served[2]["shipped"]
    prompts = [gguf.encode(p) for p in ("Paris is", "The sea is", "My favourite food is")]
    cfg = GenerateConfig(max_new_tokens=8)

    async def together():
        return await asyncio.gather(*[gguf.complete("shipped", p, cfg) for p in prompts])

    async def leave_a_stream_early():
        it = gguf.stream("shipped", prompts[0], GenerateConfig(max_new_tokens=400))
        await it.__anext__()
        await it.aclose()  # what the server does when the client hangs up
        return await gguf.complete("shipped", prompts[1], cfg)

    at_once = asyncio.run(together())  # one context: the worker thread runs them in turn
    alone = [asyncio.run(gguf.complete("shipped", p, cfg)) for p in prompts]
    assert [(c.ids, c.text) for c in at_once] == [(c.ids, c.text) for c in alone]
    assert all(len(c.ids) == 8 and c.finish_reason == "length" for c in alone)
    before = gguf.generated_tokens
    assert asyncio.run(leave_a_stream_early()).ids == alone[1].ids
    assert gguf.generated_tokens - before < 100  # the abandoned stream stopped far short of its 400 tokens


def test_bad_gguf_specs_are_one_line_user_errors(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    (tmp_path / "two").mkdir()
    for name in ("a-f16.gguf", "a-q8_0.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    cases = {
        str(tmp_path / "missing.gguf"): "not found",
        str(junk): "could not load",
        str(tmp_path / "two"): "name the one to serve",
    }
    for spec, says in cases.items():
        cfg = _cfg({"shipped": spec})
        with pytest.raises(UserError) as e:
            load_models(cfg, dict(cfg.serve.models))
        assert says in str(e.value) and "serve.models.shipped" in str(e.value) and "\n" not in str(e.value)
