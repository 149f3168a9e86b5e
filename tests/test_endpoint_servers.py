"""endpoint:NAME systems against a second, independent OpenAI-compatible server: `transformers serve`.

Our own `tunesmith serve` is the first (tests/test_systems.py). Hugging Face's server is a separate
implementation of the same API (its own chat templating, usage counting and error bodies), started here as
a subprocess on a free loopback port, offline, serving the tiny model dir this module saves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import tiny
from tests.test_systems import TEST, TRAIN, cfg_for, write_jsonl
from tunesmith.config import UserError
from tunesmith.eval.compare import compare

for _module in ("openai", "fastapi", "uvicorn", "httpx"):  # `transformers serve`'s extras and our client
    pytest.importorskip(_module)
if importlib.util.find_spec("transformers.cli.transformers") is None:  # the CLI's home since transformers 5
    pytest.skip("this transformers has no `transformers serve` CLI module", allow_module_level=True)

pytestmark = pytest.mark.slow  # a second Python process importing transformers before it answers

# Importing torch + transformers + fastapi and loading the model: 8.6 s of CPU; 44 s of wall time measured
# on a 2-core box at load average 9, so the deadline only catches a server that will never answer.
SERVE_START_S = 120


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(model_dir: Path, log: Path):
    """`transformers serve` pinned to `model_dir` on CPU, offline, as a subprocess -> base URL (no /v1)."""
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.exit(main())",
        "serve",
        str(model_dir),
        *("--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            assert proc.poll() is None, (
                f"transformers serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, (
                f"transformers serve not up in {SERVE_START_S} s:\n{log.read_text()}"
            )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    model_dir = tiny.save_model_dir(root / "tiny-llama", arch="llama")
    return root, model_dir, write_jsonl(root / "train.jsonl", TRAIN), write_jsonl(root / "test.jsonl", TEST)


@pytest.fixture(scope="module")
def hf_url(files):
    root, model_dir, _, _ = files
    with transformers_serve(model_dir, root / "transformers-serve.log") as url:
        yield url


def endpoint_cfg(files, url: str, model: str, out: str):
    """compare's config: base (asked in this process) beside endpoint:hf (the same model dir, served)."""
    return cfg_for(
        files,
        out,
        "data.template=chat",
        "eval.systems=[base,endpoint:hf]",
        f"eval.endpoints={{hf: {{base_url: '{url}/v1', model: '{model}', max_retries: 0}}}}",
    )


def test_compare_asks_transformers_serve_beside_the_local_model(files, hf_url):
    _, model_dir, _, _ = files
    cfg = endpoint_cfg(files, hf_url, str(model_dir), "hf")  # a pinned server's model id is its path
    metrics = compare(cfg)
    rows = [
        json.loads(x) for x in (Path(cfg.out_dir) / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4  # eval.limit test questions
    hf = metrics["endpoint:hf"]
    # the same weights, greedy, under the same chat template: the same answers and prompt lengths as here
    assert [r["endpoint:hf"]["answer"] for r in rows] == [r["base"]["answer"] for r in rows]
    assert hf["prompt_tokens"] == metrics["base"]["prompt_tokens"] > 0  # transformers serve's own count
    assert hf["latency_p50_s"] > 0 and "loss" not in hf


def test_a_model_transformers_serve_does_not_serve_is_one_line(files, hf_url):
    cfg = endpoint_cfg(files, hf_url, "no-such-model", "hf-wrong")
    with pytest.raises(UserError) as e:
        compare(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        f"eval.endpoints.hf: {hf_url}/v1/chat/completions answered HTTP 400 (Server is pinned"
    )
    assert "requested 'no-such-model'" in msg and "check eval.endpoints.hf.model" in msg
    assert msg.endswith(f"(asking {files[3]}:1: {TEST[0]['question']})")
