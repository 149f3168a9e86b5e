"""bench/train_vs_trl.py's accounting: TRL's batches carry exactly tunesmith's loss tokens, on every side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from tests import tiny
from tunesmith.data.pipeline import build

pytest.importorskip("trl", reason="the bench extra (pip install -e '.[bench]') is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_vs_trl as bench  # noqa: E402


def test_trl_sides_train_on_tunesmiths_loss_tokens(tmp_path):
    model_dir = tiny.save_model_dir(tmp_path / "model", arch="llama")
    cfg = tiny.train_config(
        tmp_path, model_dir, tiny.write_qa(tmp_path / "qa.jsonl", n=28), "data.template=chat"
    )
    tok = tiny.tokenizer()
    samples = build(cfg, tok, None).train
    # by hand: every sample starts with its prompt, so its loss tokens are its labelled tokens (answer + EOS)
    labelled = sum(sum(x != -100 for x in s["labels"]) for s in samples)
    real = sum(len(s["input_ids"]) for s in samples)
    assert samples[0]["labels"][0] == -100 and labelled > 0
    assert bench.packed_loss_tokens(samples, 1, 64, tok.pad_token_id) == labelled
    a = argparse.Namespace(max_length=64, epochs=1, lr=1e-3, method="lora", precision="fp32")
    for side in ("trl-packing", "trl-padding-free", "trl-padding"):
        trainer = bench.trl_trainer(a, tmp_path / side, side, 4, samples, tok, tiny.llama())
        counts = [bench.trl_batch_counts(b) for b in trainer.get_train_dataloader()]
        assert (sum(r for r, _ in counts), sum(n for _, n in counts)) == (real, labelled), side
