"""The playground in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

import json
import os

import pytest

from tests import tiny
from tests.test_openai_client import running_server
from tests.test_serve import write_eval_run
from tunesmith.config import Config, GenerateConfig, ServeConfig
from tunesmith.data.formats import Example, get_template
from tunesmith.generate import generate, prompt_ids
from tunesmith.serve.app import create_app
from tunesmith.serve.playground import example_questions
from tunesmith.serve.scheduler import LoadedModel

CHROMIUM = os.environ.get("TUNESMITH_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_playground_streams_two_answers_side_by_side():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium; CI installs it in .ci/run)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    tok, template = tiny.tokenizer(), get_template("qa", "qa")
    base, tuned = tiny.gpt_neox(seed=0), tiny.gpt_neox(seed=1)  # two different models: answers must differ
    models = {
        "base": LoadedModel("base", base, tok, template),
        "tuned": LoadedModel("tuned", tuned, tok, template),
    }
    question = "What was the revenue of Acme?"
    cfg = Config(generate=GenerateConfig(max_new_tokens=16), serve=ServeConfig(max_wait_ms=5))
    want = {
        n: generate(
            m.model,
            tok,
            [prompt_ids(template, tok, [{"role": "user", "content": question}])],
            GenerateConfig(max_new_tokens=16),
        )[0].text
        for n, m in models.items()
    }
    assert want["base"] != want["tuned"]
    app = create_app(cfg, models, examples=[question, "How many employees?"])
    with running_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            blocked = []  # every request must stay on the server: the page is self-contained
            page.on("request", lambda r: None if r.url.startswith(url) else blocked.append(r.url))
            page.goto(url + "/")
            assert page.locator("#left-model").input_value() == "base"
            assert page.locator("#right-model").input_value() == "tuned"
            page.fill("#question", question)
            page.fill("#max-tokens", "16")
            page.click("#send")
            for side in ("left", "right"):
                page.wait_for_function(
                    f"document.getElementById('{side}-stat').textContent.includes('tokens/s')", timeout=30_000
                )
            left, right = page.inner_text("#left-answer"), page.inner_text("#right-answer")
            assert left.strip() == want["base"].strip() and right.strip() == want["tuned"].strip()
            assert "16 tokens" in page.inner_text("#left-stat")
            page.click("#examples button >> nth=1")  # one click on an example asks it
            assert page.locator("#question").input_value() == "How many employees?"
            assert blocked == []
        finally:
            browser.close()


def test_example_chips_ask_the_plain_question_of_a_chat_model(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium; CI installs it in .ci/run)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    tok, template = tiny.tokenizer(), get_template("chat", "chat")
    questions = ["What was the revenue of Acme?", "How many employees?"]
    # a finished compare run: predictions.jsonl rows hold the rendered chat prompt next to the question
    write_eval_run(
        tmp_path / "run",
        [Example(f"qa.jsonl:{i}", fields={"question": q, "answer": "x"}) for i, q in enumerate(questions)],
        template,
    )
    examples = example_questions(Config(out_dir=str(tmp_path / "run")))
    assert examples == questions
    model = tiny.llama()
    model.generation_config.eos_token_id = None
    models = {n: LoadedModel(n, model, tok, template) for n in ("base", "tuned")}
    want = generate(
        model,
        tok,
        [prompt_ids(template, tok, [{"role": "user", "content": questions[1]}])],
        GenerateConfig(max_new_tokens=8),
    )[0].text
    app = create_app(
        Config(generate=GenerateConfig(max_new_tokens=8), serve=ServeConfig(max_wait_ms=5)), models, examples
    )
    with running_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            sent = []
            page.on(
                "request",
                lambda r: (
                    sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None
                ),
            )
            page.goto(url + "/")
            chips = page.locator("#examples button")
            assert chips.all_inner_texts() == questions
            page.fill("#max-tokens", "8")
            chips.nth(1).click()
            page.wait_for_function(
                "document.getElementById('left-stat').textContent.includes('tokens/s')", timeout=30_000
            )
            assert [b["messages"] for b in sent] == [[{"role": "user", "content": questions[1]}]] * 2
            assert (
                page.inner_text("#left-answer").strip() == want.strip()
            )  # the template applied once, by the server
        finally:
            browser.close()


def test_a_failure_after_the_stream_began_shows_as_an_error():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium; CI installs it in .ci/run)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    tok, template = tiny.tokenizer(), get_template("qa", "qa")
    model = tiny.gpt_neox()
    model.generation_config.eos_token_id = None
    steps = {"n": 0}

    def fail_from_fourth_step(*_):
        steps["n"] += 1
        if steps["n"] >= 4:  # every later step too, should the two panes land in two batches
            raise RuntimeError("device fell over")

    model.register_forward_pre_hook(fail_from_fourth_step)
    app = create_app(
        Config(serve=ServeConfig(max_wait_ms=50)), {"tiny": LoadedModel("tiny", model, tok, template)}
    )
    with running_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#question", "What was the revenue of Acme?")
            page.click("#send")  # both panes ask the one model: one batch, which fails mid-answer
            for side in ("left", "right"):
                page.wait_for_function(
                    f"document.getElementById('{side}-answer').className.includes('error')", timeout=30_000
                )
                assert "device fell over" in page.inner_text(
                    f"#{side}-answer"
                )  # before: a cut answer, shown as whole
        finally:
            browser.close()
