"""CUDA paths: bf16 training and QLoRA. Skipped without a GPU (CI has none; run on a lent GPU machine)."""

import json

import pytest
import torch

from tests import tiny
from tunesmith.config import load_config
from tunesmith.train.loop import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg(tmp_path, *over):
    model_dir = tiny.save_model_dir(tmp_path / "m", arch="llama")
    data = tiny.write_qa(tmp_path / "qa.jsonl")
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={data}",
            f"out_dir={tmp_path / 'run'}",
            "data.test_size=4",
            "data.max_length=64",
            "train.batch_size=8",
            "train.log_every=1",
            "train.scheduler=constant",
            *over,
        ],
    )


def _losses(tmp_path):
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_bf16_full_finetune_on_cuda(tmp_path):
    result = train(_cfg(tmp_path, "train.max_steps=30", "train.lr=3e-3"))
    losses = _losses(tmp_path)
    assert losses[-1] < 0.6 * losses[0]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert m.dtype == torch.bfloat16  # model.dtype=auto -> bf16 weights on a bf16 GPU
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["measured"]["peak_memory_bytes"] > 0 and result["eval"]["loss"] > 0


def test_qlora_trains_adapters_only(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(
        _cfg(
            tmp_path,
            "train.max_steps=20",
            "train.lr=3e-3",
            "lora.quantize=4bit",
            "lora.r=8",
            "lora.dropout=0.0",
        )
    )
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "m"), tmp_path / "run" / "final"
    )
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)
