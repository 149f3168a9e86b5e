"""The shipped configs end to end: a reduced `make quickstart` on the real SmolLM2, and the pythia config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reduced_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    small = [
        f"out_dir={out}",
        "data.limit=16",
        "train.max_steps=3",
        "train.epochs=1",
        "eval.limit=4",
        "eval.probe=4",
        "eval.max_new_tokens=12",
        "data.test_size=8",
    ]
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", *small],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("== inspect", "== plan", "== train", "== compare", "time per step"):
        assert step in proc.stdout
    assert f"report:        {out}/eval/report.html" in proc.stdout
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"base", "tuned", "delta"} <= metrics.keys() and "probe_numeric_recall" in metrics["tuned"]
    assert metrics["systems"] == ["base", "base+fewshot", "base+rag", "tuned", "tuned+rag"]
    assert metrics["base+rag"]["retrieval_recall"] is not None and metrics["verdict"]
    assert (out / "eval" / "report.html").stat().st_size > 10_000
    plan = json.loads((out / "plan.json").read_text())
    assert plan["measured"]["tokens_per_s"] > 0
    # the shipped train.time_budget sized the run from its warm-up: 3 steps of SmolLM2 fit in minutes
    assert plan["budget"]["steps"] == 3 and "time budget" in proc.stdout


def test_course_config_runs_through_a_local_pythia_stand_in(tmp_path):
    """configs/pythia70m-lamini-docs.yaml, hub ids swapped for a local GPT-NeoX of reduced pythia shape."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests import tiny
    from tunesmith.train.loop import train

    torch.manual_seed(0)
    # pythia-70m's class and layout (rotary_pct 0.25, untied head, parallel residual), narrower to stay fast.
    shape = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        intermediate_size=256,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_parallel_residual=True,
    )
    model_dir = tmp_path / "pythia-standin"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=400, **shape)).save_pretrained(model_dir)
    tiny.tokenizer().save_pretrained(model_dir)
    data = tiny.write_qa(tmp_path / "lamini_docs.jsonl", n=24)  # the lamini_docs schema: question / answer
    cfg = load_config(
        ROOT / "configs" / "pythia70m-lamini-docs.yaml",
        [
            f"model.name={model_dir}",
            f"data.path={data}",
            f"out_dir={tmp_path / 'run'}",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.save_every=2",
            "data.test_size=4",
        ],
    )
    assert cfg.train.lr == 1e-5 and cfg.data.template == "qa"
    result = train(cfg)
    assert result["steps"] == 4 and (tmp_path / "run" / "final" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model_type"] == "gpt_neox"


def test_shipped_configs_leave_precision_to_the_hardware():
    # train.precision=auto: bf16 autocast where bf16 matmuls are native, fp32 on CPUs that emulate bf16 (AVX2
    # only, 7.5x slower there). Every command resolves it the same way, so no script may switch it for train
    # alone.
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_config(path, []).train.precision == "auto", path.name
    script = (ROOT / "scripts" / "quickstart.sh").read_text()
    assert 'step train   tunesmith train "$CFG" "$@"' in script and "train.precision=$" not in script
