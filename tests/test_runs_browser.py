"""`tunesmith runs compare`'s page in a real headless Chromium (/usr/bin/chromium driven by Playwright)."""

from __future__ import annotations

import os

import pytest

from tests.test_playground_browser import ARGS, CHROMIUM
from tunesmith.config import load_config
from tunesmith.runs.compare import compare_runs
from tunesmith.train.loop import train


def test_compare_page_renders_its_plot_and_config_diff(tmp_path, model_dir, qa_file):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium; CI installs it in .ci/run)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    runs = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        over = [
            f"model.name={model_dir}",
            f"data.path={qa_file}",
            f"out_dir={tmp_path / name}",
            "data.test_size=4",
            "data.max_length=64",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.log_every=1",
            f"train.lr={lr}",
        ]
        runs.append(tmp_path / name)
        train(load_config(None, over))
    page_path = compare_runs(runs, tmp_path / "compare.html")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert page.title() == "tunesmith runs compare: a vs b"
            widths = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)"
            )
            assert len(widths) == 1 and widths[0] > 0  # the inline PNG decoded
            diff = page.eval_on_selector_all(
                "#config-diff tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText))"
            )
            assert ["train.lr", "0.003", "0.001"] in diff
            assert "train.batch_size" not in [row[0] for row in diff]
            statuses = page.eval_on_selector_all(
                "#runs tbody tr", "rows => rows.map(r => r.cells[1].innerText)"
            )
            assert statuses == ["finished", "finished"]
            assert errors == []
            assert all(u.startswith(("file:", "data:")) for u in requests)  # self-contained: nothing fetched
        finally:
            browser.close()
