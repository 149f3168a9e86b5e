"""The official `openai` package against a real uvicorn server on a loopback port: answers = `generate`."""

import contextlib
import threading
import time

import httpx
import pytest
import uvicorn

from tests import tiny
from tunesmith.config import Config, GenerateConfig, ServeConfig
from tunesmith.data.formats import get_template
from tunesmith.generate import generate, prompt_ids
from tunesmith.serve.app import create_app
from tunesmith.serve.scheduler import LoadedModel

openai = pytest.importorskip("openai")


@contextlib.contextmanager
def running_server(app):
    """uvicorn serving `app` in a thread on 127.0.0.1 and a free port -> base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def _model(template) -> LoadedModel:
    model, tok = tiny.llama(), tiny.tokenizer()
    model.generation_config.eos_token_id = None
    return LoadedModel("tiny-chat", model, tok, template)


def test_openai_client_end_to_end():
    lm = _model(get_template("chat", "chat"))
    cfg = Config(generate=GenerateConfig(max_new_tokens=12), serve=ServeConfig(max_wait_ms=5))
    app = create_app(cfg, {"tiny-chat": lm})
    messages = [{"role": "user", "content": "What was the revenue of Acme?"}]
    want_chat = generate(
        lm.model, lm.tokenizer, [prompt_ids(lm.template, lm.tokenizer, messages)], cfg.generate
    )[0]
    want_text = generate(
        lm.model, lm.tokenizer, [lm.tokenizer("hello world")["input_ids"]], GenerateConfig(max_new_tokens=7)
    )[0]
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        comp = client.completions.create(model="tiny-chat", prompt="hello world", max_tokens=7, temperature=0)
        assert comp.choices[0].text == want_text.text and comp.usage.completion_tokens == 7
        chat = client.chat.completions.create(model="tiny-chat", messages=messages)
        assert chat.choices[0].message.content == want_chat.text
        assert chat.choices[0].finish_reason == want_chat.finish_reason
        assert chat.usage.prompt_tokens == want_chat.prompt_tokens
        pieces, finish = [], None
        for ev in client.chat.completions.create(model="tiny-chat", messages=messages, stream=True):
            if ev.choices and ev.choices[0].delta.content:
                pieces.append(ev.choices[0].delta.content)
            if ev.choices and ev.choices[0].finish_reason:
                finish = ev.choices[0].finish_reason
        assert "".join(pieces) == want_chat.text and len(pieces) > 1 and finish == want_chat.finish_reason
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=messages)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10_000)


def test_client_disconnect_mid_stream_frees_the_slot():
    lm = _model(get_template("qa", "qa"))
    app = create_app(Config(serve=ServeConfig(max_wait_ms=0, max_tokens_cap=500)), {"tiny-chat": lm})
    sched = app.state.scheduler
    body = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 500, "stream": True}
    with running_server(app) as url, httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
        # the next request is served; the abandoned row stopped long before 500 tokens
        r = http.post(url + "/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    assert sched.batches == 2 and sched.generated_tokens < 300
