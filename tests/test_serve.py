"""The OpenAI-compatible server on tiny real models: endpoints, streaming, errors, auth, batching, LoRA."""

import asyncio
import copy
import json

import pytest
import torch
from fastapi.testclient import TestClient

from tests import tiny
from tunesmith.config import Config, GenerateConfig, ServeConfig, UserError
from tunesmith.data.formats import Example, get_template
from tunesmith.data.render import render_prompt
from tunesmith.generate import generate
from tunesmith.serve.app import create_app, load_models
from tunesmith.serve.scheduler import Job, LoadedModel, Scheduler

QA = get_template("qa", "qa")
CHAT = get_template("chat", "chat")


def _cfg(**serve) -> Config:
    return Config(
        generate=GenerateConfig(max_new_tokens=8),
        serve=ServeConfig(max_tokens_cap=64, max_request_bytes=4000, max_wait_ms=5, **serve),
    )


def _models(template=QA, **over) -> dict[str, LoadedModel]:
    model, tok = tiny.gpt_neox(**over), tiny.tokenizer()
    model.generation_config.eos_token_id = None
    return {"tiny": LoadedModel("tiny", model, tok, template)}


def _greedy(lm: LoadedModel, ids: list[int], n: int = 8) -> str:
    return generate(lm.model, lm.tokenizer, [ids], GenerateConfig(max_new_tokens=n))[0].text


def _sse(text: str) -> list:
    """SSE body -> list of decoded data payloads ('[DONE]' kept as a string)."""
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def test_health_models_and_playground():
    with TestClient(create_app(_cfg(), _models(), examples=["What was Q3 revenue?"])) as c:
        assert c.get("/health").json() == {"status": "ok", "models": ["tiny"]}
        data = c.get("/v1/models").json()
        assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]
        html = c.get("/").text
        assert "What was Q3 revenue?" in html and "<script>" in html
        assert "http://" not in html and "https://" not in html and "<link" not in html  # self-contained


def test_completion_equals_generate_and_counts_usage():
    models = _models()
    lm = models["tiny"]
    with TestClient(create_app(_cfg(), models)) as c:
        r = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": "What was the revenue", "max_tokens": 6}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    ids = lm.tokenizer("What was the revenue")["input_ids"]
    assert body["choices"][0]["text"] == _greedy(lm, ids, 6)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}


@pytest.mark.parametrize("template", [QA, CHAT])
def test_chat_uses_the_training_template(template):
    models = _models(template)
    lm = models["tiny"]
    messages = [{"role": "user", "content": "How many employees?"}]
    with TestClient(create_app(_cfg(), models)) as c:
        body = c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages}).json()
    ex = (
        Example("request", fields={"question": "How many employees?"})
        if template is QA
        else Example("request", messages=messages)
    )
    ids = render_prompt(ex, template, lm.tokenizer)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": _greedy(lm, ids)}
    assert body["usage"]["prompt_tokens"] == len(ids) and body["object"] == "chat.completion"


def test_streaming_chat_and_completion():
    with TestClient(create_app(_cfg(), _models())) as c:
        req = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
        whole = c.post("/v1/chat/completions", json=req).json()
        r = c.post("/v1/chat/completions", json={**req, "stream": True})
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        assert text == whole["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == whole["usage"]
        assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
        r = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True}
        )
        events = _sse(r.text)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
        plain = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 5}).json()
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain["choices"][0]["text"]


def test_stop_strings_in_a_request():
    models = _models()
    with TestClient(create_app(_cfg(), models)) as c:
        full = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 12}).json()[
            "choices"
        ][0]
        stop = full["text"][3:5]
        cut = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 12, "stop": stop}
        ).json()
    assert cut["choices"][0]["text"] == full["text"][: full["text"].index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def _error(r, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_errors_are_openai_shaped():
    with TestClient(create_app(_cfg(), _models(max_position_embeddings=32))) as c:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        _error(
            c.post(
                "/v1/chat/completions",
                content=b'{"model": "tiny", "messages": [',
                headers={"content-type": "application/json"},
            ),
            400,
        )
        _error(c.post("/v1/chat/completions", json=[1, 2]), 400)
        assert (
            _error(c.post("/v1/chat/completions", json={**chat, "model": "gpt-9"}), 404, "model")["code"]
            == "model_not_found"
        )
        _error(c.post("/v1/chat/completions", json={**chat, "max_tokens": "5"}), 422, "max_tokens")
        _error(c.post("/v1/chat/completions", json={**chat, "temperature": "hot"}), 422, "temperature")
        _error(c.post("/v1/chat/completions", json={"model": "tiny"}), 422, "messages")
        _error(
            c.post("/v1/chat/completions", json={**chat, "messages": [{"role": "wizard", "content": "x"}]}),
            422,
        )
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": 42}), 422)
        _error(c.post("/v1/chat/completions", json={**chat, "max_tokens": 65}), 400, "max_tokens")
        long = {"model": "tiny", "prompt": "hello world " * 40}
        assert _error(c.post("/v1/completions", json=long), 400)["code"] == "context_length_exceeded"
        assert (
            _error(c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 5000}), 413)["code"]
            == "request_too_large"
        )
        _error(c.get("/v1/nothing"), 404)
        # near the context end: an explicit max_tokens that does not fit is refused (as OpenAI does), while
        # the default limit shrinks to the room that is left and finish_reason says the answer was cut
        tok = tiny.tokenizer()
        k = max(k for k in range(1, 40) if len(tok("hello world " * k)["input_ids"]) < 28)
        n = len(tok("hello world " * k)["input_ids"])
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello world " * k, "max_tokens": 20})
        err = _error(r, 400, "max_tokens")
        assert err["code"] == "context_length_exceeded" and f"at most {32 - n}" in err["message"]
        r = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hello world " * k, "max_tokens": 32 - n}
        )
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 32
        r = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hello world " * k}
        )  # default: 8, or the room left
        assert (
            r.json()["usage"]["completion_tokens"] == min(8, 32 - n)
            and r.json()["choices"][0]["finish_reason"] == "length"
        )


def test_bearer_auth(monkeypatch):
    monkeypatch.setenv("TUNESMITH_TEST_KEY", "s3cret")
    with TestClient(create_app(_cfg(api_key_env="TUNESMITH_TEST_KEY"), _models())) as c:
        assert c.get("/health").status_code == 200
        assert _error(c.get("/v1/models"), 401)["type"] == "authentication_error"
        _error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert (
            c.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=ok).status_code == 200
        )
        assert '"auth": true' in c.get("/").text


def test_requests_arriving_together_share_one_batch():
    models = _models()
    lm = models["tiny"]
    prompts = [
        lm.tokenizer(t)["input_ids"] for t in ("hello", "What was the revenue", "The quick brown fox", "user")
    ]
    limits = [3, 8, 5, 8]

    async def main(sched):
        cfg = GenerateConfig(max_new_tokens=8)
        return await asyncio.gather(
            *[
                sched.complete("tiny", p, cfg.model_copy(update={"max_new_tokens": n}))
                for p, n in zip(prompts, limits, strict=True)
            ]
        )

    sched = Scheduler(models, max_batch_size=8, max_wait_ms=300)
    out = asyncio.run(main(sched))
    sched.close()
    assert sched.batches == 1
    for p, n, c in zip(prompts, limits, out, strict=True):
        ref = generate(lm.model, lm.tokenizer, [p], GenerateConfig(max_new_tokens=n))[0]
        assert (c.ids, c.text, c.finish_reason) == (ref.ids, ref.text, "length")
    sched = Scheduler(models, max_batch_size=1, max_wait_ms=0)
    asyncio.run(main(sched))
    sched.close()
    assert sched.batches == 4


def test_leaving_a_stream_frees_its_row():
    models = _models()
    lm = models["tiny"]

    async def main(sched):
        it = sched.stream("tiny", lm.tokenizer("hello")["input_ids"], GenerateConfig(max_new_tokens=400))
        await it.__anext__()
        await it.aclose()  # what the server does when the client disconnects
        return await sched.complete("tiny", lm.tokenizer("hi")["input_ids"], GenerateConfig(max_new_tokens=2))

    sched = Scheduler(models, max_batch_size=8, max_wait_ms=0)
    asyncio.run(main(sched))
    sched.close()
    assert sched.batches == 2 and sched.generated_tokens < 100  # far from the 400 asked for


def test_adapter_switching_on_one_shared_base():
    from peft import LoraConfig, get_peft_model

    tok = tiny.tokenizer()
    base = tiny.gpt_neox()
    base.generation_config.eos_token_id = None
    plain = copy.deepcopy(base)
    torch.manual_seed(3)
    peft = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query_key_value", "dense_4h_to_h"], init_lora_weights=False)
    ).eval()
    assert any(p.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_B" in n)
    merged = copy.deepcopy(peft).merge_and_unload()
    models = {
        "base": LoadedModel("base", peft, tok, QA, adapter=None),
        "tuned": LoadedModel("tuned", peft, tok, QA, adapter="default"),
    }
    prompt = tok("What was the revenue")["input_ids"]
    want = {
        "base": _greedy(LoadedModel("p", plain, tok, QA), prompt),
        "tuned": _greedy(LoadedModel("m", merged, tok, QA), prompt),
    }
    assert want["base"] != want["tuned"]
    with TestClient(create_app(_cfg(), models)) as c:
        for name in ("tuned", "base", "tuned", "base"):
            r = c.post("/v1/completions", json={"model": name, "prompt": "What was the revenue"})
            assert r.json()["choices"][0]["text"] == want[name], name


def test_load_models_shares_the_base_between_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = tiny.save_model_dir(tmp_path / "base")
    for i, name in enumerate(("a1", "a2")):
        model = tiny.gpt_neox()
        torch.manual_seed(10 + i)  # after building: tiny.gpt_neox() seeds torch itself
        peft = get_peft_model(
            model, LoraConfig(r=2, target_modules=["query_key_value"], init_lora_weights=False)
        )
        peft.peft_config["default"].base_model_name_or_path = str(base_dir)
        peft.save_pretrained(tmp_path / name)
    specs = {"base": str(base_dir), "one": str(tmp_path / "a1"), "two": str(tmp_path / "a2")}
    models = load_models(Config(model={"name": str(base_dir)}), specs)
    assert models["base"].model is models["one"].model is models["two"].model
    assert [models[n].adapter for n in specs] == [None, "adapter0", "adapter1"]
    cfg = _cfg()
    with TestClient(create_app(cfg, models)) as c:
        texts = [
            c.post("/v1/completions", json={"model": n, "prompt": "hello"}).json()["choices"][0]["text"]
            for n in specs
        ]
    assert len(set(texts)) == 3


def write_eval_run(run, examples, template) -> None:
    """A finished compare run's files as compare and the data cache write them (predictions, tests)."""
    from dataclasses import asdict

    from tunesmith.eval.questions import questions_for

    qs = questions_for(examples, [], template, tiny.tokenizer())
    (run / "eval").mkdir(parents=True)
    (run / "data").mkdir()
    rows = [
        {"where": ex.where, "prompt": p, "question": q}
        for ex, p, q in zip(examples, qs.prompt_texts, qs.questions, strict=True)
    ]
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "data" / "test_examples.jsonl").write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))


def test_example_questions_from_predictions_or_test_split(tmp_path):
    from tunesmith.serve.app import model_specs
    from tunesmith.serve.playground import example_questions

    qa = tiny.write_qa(tmp_path / "qa.jsonl", n=40)
    cfg = Config(data={"path": str(qa), "test_size": 0.25}, out_dir=str(tmp_path / "run"))
    found = example_questions(cfg, limit=3)
    assert len(found) == 3 and all(q.startswith("What was the revenue of company") for q in found)
    assert model_specs(cfg) == {"base": "smollm2-135m-instruct"}
    (tmp_path / "run" / "final").mkdir(parents=True)
    examples = [Example(f"qa.jsonl:{i}", fields={"question": f"Q{i}?", "answer": "A."}) for i in (1, 2)]
    write_eval_run(tmp_path / "run", examples, CHAT)
    assert example_questions(cfg) == ["Q1?", "Q2?"]  # not the rendered '<|im_start|>user\nQ1?<eos>...'
    assert model_specs(cfg) == {"base": "smollm2-135m-instruct", "tuned": str(tmp_path / "run" / "final")}
    assert (
        example_questions(Config(data={"path": str(tmp_path / "missing.jsonl")}, out_dir=str(tmp_path / "x")))
        == []
    )


def test_example_questions_are_the_user_turn_of_chat_data(tmp_path):
    from tunesmith.serve.playground import example_questions

    messages = [
        {"role": "system", "content": "You are a terse analyst."},
        {"role": "user", "content": "What was Q3 revenue?"},
        {"role": "assistant", "content": "$34 million."},
    ]
    write_eval_run(tmp_path / "run", [Example("chat.jsonl:1", messages=messages)], CHAT)
    cfg = Config(data={"path": str(tmp_path / "chat.jsonl"), "format": "chat"}, out_dir=str(tmp_path / "run"))
    assert example_questions(cfg) == ["What was Q3 revenue?"]
    (
        tmp_path / "run" / "data" / "test_examples.jsonl"
    ).unlink()  # no cache: the stored question, never the prompt
    assert example_questions(cfg) == ["You are a terse analyst.\nWhat was Q3 revenue?"]
    (tmp_path / "run" / "eval" / "predictions.jsonl").write_text(
        '{"where": "x", "question": "Q?"}\n{"where": '
    )
    with pytest.raises(UserError, match=r"predictions.jsonl:2: invalid JSON"):
        example_questions(cfg, limit=5)


def test_extreme_sampling_values_are_refused_or_safe():
    models = _models()
    lm = models["tiny"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with TestClient(create_app(_cfg(), models)) as c:
        for stream in (False, True):
            body = {**chat, "stream": stream}
            _error(
                c.post("/v1/chat/completions", json={**body, "seed": 2**64}), 422, "seed"
            )  # torch.manual_seed overflowed: 500
            _error(
                c.post("/v1/chat/completions", json={**body, "repetition_penalty": 1e300}),
                422,
                "repetition_penalty",
            )
            nan = json.dumps(body)[:-1] + ', "temperature": NaN}'
            _error(c.post("/v1/chat/completions", content=nan.encode()), 422, "temperature")
            lone = json.dumps(
                {**body, "messages": [{"role": "user", "content": "\ud800"}]}
            )  # -> "\\ud800" on the wire
            assert (
                _error(c.post("/v1/chat/completions", content=lone.encode()), 400)["code"] == "invalid_json"
            )
        # temperature 1e-300 divided the logits to inf (NaN probabilities, a 500): it is greedy decoding
        r = c.post("/v1/chat/completions", json={**chat, "temperature": 1e-300})
        ids = render_prompt(Example("request", fields={"question": "hi"}), QA, lm.tokenizer)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == _greedy(lm, ids, 4)
        assert c.get("/v1/models/tiny").json()["id"] == "tiny"
        _error(c.get("/v1/models/gpt-9"), 404, "model")


def test_closing_the_scheduler_answers_the_jobs_still_waiting():
    async def main():
        sched = Scheduler(_models(), max_batch_size=1, max_wait_ms=0)  # no worker: as after its last batch
        loop = asyncio.get_running_loop()
        job = Job("tiny", [1, 2, 3], GenerateConfig(max_new_tokens=2), loop, loop.create_future())
        sched.held.append(
            job
        )  # taken from the inbox, waiting for a batch of its kind, as the server shuts down
        sched.close()
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(job.future, timeout=10)  # before: no answer, ever

    asyncio.run(main())


@pytest.mark.parametrize("template", [QA, CHAT])
def test_earlier_turns_reach_a_string_template_as_compares_fewshot(template, monkeypatch):
    from tunesmith.eval.prompts import prompt_for

    models = _models(template)
    tok = models["tiny"].tokenizer
    sent = []  # the prompt ids the scheduler was given
    submit = Scheduler._submit
    monkeypatch.setattr(
        Scheduler,
        "_submit",
        lambda self, model, ids, *a, **kw: sent.append(ids) or submit(self, model, ids, *a, **kw),
    )
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What was Q3 revenue?"},
        {"role": "assistant", "content": "34 million"},
        {"role": "user", "content": "How many employees?"},
    ]
    with TestClient(create_app(_cfg(), models)) as c:
        body = c.post("/v1/chat/completions", json={"model": "tiny", "messages": turns}).json()
    if template is QA:
        # compare's +fewshot with one shot; the system turn is left out (no place in a string template)
        question = Example("test", fields={"question": "How many employees?", "answer": "120"})
        shot = Example("train", fields={"question": "What was Q3 revenue?", "answer": "34 million"})
        expected = prompt_for(question, QA, tok, [shot], None)
        assert tok.decode(expected) == (
            "### Question:\nWhat was Q3 revenue?\n\n### Answer:\n34 million\n\n"
            "### Question:\nHow many employees?\n\n### Answer:\n"
        )
    else:  # a chat template renders the whole conversation, as it always did
        expected = render_prompt(Example("request", messages=turns), CHAT, tok)
    assert sent == [expected] and body["usage"]["prompt_tokens"] == len(expected)
