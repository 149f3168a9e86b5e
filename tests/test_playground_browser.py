"""The playground in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright's Python package)."""

import os

import pytest

from tests import tiny
from tests.test_openai_client import running_server
from tunesmith.config import Config, GenerateConfig, ServeConfig
from tunesmith.data.formats import get_template
from tunesmith.generate import generate, prompt_ids
from tunesmith.serve.app import create_app
from tunesmith.serve.scheduler import LoadedModel

CHROMIUM = os.environ.get("TUNESMITH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]


def test_playground_streams_two_answers_side_by_side():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium; CI installs it in .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    tok, template = tiny.tokenizer(), get_template("qa", "qa")
    base, tuned = tiny.gpt_neox(seed=0), tiny.gpt_neox(seed=1)  # two different models: answers must differ
    models = {"base": LoadedModel("base", base, tok, template), "tuned": LoadedModel("tuned", tuned, tok, template)}
    question = "What was the revenue of Acme?"
    cfg = Config(generate=GenerateConfig(max_new_tokens=16), serve=ServeConfig(max_wait_ms=5))
    want = {n: generate(m.model, tok, [prompt_ids(template, tok, [{"role": "user", "content": question}])],
                        GenerateConfig(max_new_tokens=16))[0].text for n, m in models.items()}
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
                page.wait_for_function(f"document.getElementById('{side}-stat').textContent.includes('tokens/s')", timeout=30_000)
            left, right = page.inner_text("#left-answer"), page.inner_text("#right-answer")
            assert left.strip() == want["base"].strip() and right.strip() == want["tuned"].strip()
            assert "16 tokens" in page.inner_text("#left-stat")
            page.click("#examples button >> nth=1")  # one click on an example asks it
            assert page.locator("#question").input_value() == "How many employees?"
            assert blocked == []
        finally:
            browser.close()
