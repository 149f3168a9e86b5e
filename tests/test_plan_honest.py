"""Numbers users can trust (issue #22): MFU never above 1, the peak's source, rows vs samples a step."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

import tunesmith.runtime
from tests import tiny
from tunesmith.config import Config, DataConfig, ModelConfig, PlanConfig, TrainConfig
from tunesmith.plan.devices import PEAK_DATES, calibrated_peak_flops, peak_key, peak_source
from tunesmith.plan.memory import HOST_RETAINED, host_memory
from tunesmith.train.log import PlainProgress
from tunesmith.train.run_plan import compare_measured, mfu, per_step_short, per_step_text, start_plan


def _plan(device: str, peak: float) -> dict:
    return {"time": {"device": device, "autocast": "fp32", "peak_flops": peak}, "flops": {"model": 1e6}}


def test_mfu_above_one_times_the_peak_again_and_stays_below_one(tmp_path, monkeypatch, capsys):
    # A peak cached at 1 GFLOP/s (timed on a busy machine) against 2,000 tokens/s x 1 MFLOP/token = 2 GFLOP/s
    # achieved: MFU would read 2.0. A real timing (any CPU does far more than 2 GFLOP/s in fp32) replaces it.
    monkeypatch.setenv("HOME", str(tmp_path))
    plan = _plan("cpu", 1e9)
    value = mfu(plan, 2000.0)
    t = plan["time"]
    assert value < 1.0 and t["peak_flops_at_start"] == 1e9 and t["peak_flops"] > 2e9
    assert value == pytest.approx(2e9 / t["peak_flops"])
    assert "timed again during the run: MFU read 2.00" in t["peak_source"]
    assert "MFU 2.00 > 1" in capsys.readouterr().out
    cached = json.loads((tmp_path / ".cache/tunesmith/peak_flops.json").read_text())
    assert cached[peak_key("cpu")] == t["peak_flops"]  # the next run starts from the better figure


def test_mfu_is_clamped_with_a_warning_when_no_peak_explains_it(capsys):
    # A named GPU's datasheet peak is not timed again: MFU 3 there means the FLOP count is wrong
    plan = _plan("h100-80gb", 1e9)
    assert mfu(plan, 3000.0) == 1.0 and mfu(plan, 4000.0) == 1.0
    assert plan["time"]["mfu_clamped"] and plan["time"]["peak_flops"] == 1e9
    out = capsys.readouterr().out
    assert out.count("reported as 1.0") == 1  # warned once, not on every log row
    assert mfu(plan, 500.0) == pytest.approx(0.5)  # below 1: untouched


def test_peak_source_says_measured_now_or_cached_from_a_date(tmp_path, monkeypatch):
    timings = iter([5e10, 2e10])  # a quiet machine, then a busy one
    monkeypatch.setattr(tunesmith.runtime, "_matmul_flops", lambda dev, amp: next(timings))
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    assert calibrated_peak_flops("cpu") == 5e10
    assert peak_source("cpu").startswith("measured now (20")
    cache = tmp_path / "a/.cache/tunesmith"
    dated = json.loads((cache / PEAK_DATES).read_text())[peak_key("cpu")]
    # another cache (another process, as far as runtime's once-per-process timing knows), holding that best
    (tmp_path / "b/.cache").mkdir(parents=True)
    (cache.parent / "tunesmith").rename(tmp_path / "b/.cache/tunesmith")
    monkeypatch.setenv("HOME", str(tmp_path / "b"))
    assert calibrated_peak_flops("cpu") == 5e10  # 2e10 timed now: the best stands
    assert peak_source("cpu") == f"cached from {dated} (best timing so far; this run's was not higher)"


def test_a_step_counts_rows_samples_and_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tiny.save_model_dir(tmp_path / "m")
    cfg = Config(
        model=ModelConfig(name=str(path)),
        data=DataConfig(max_length=100),
        train=TrainConfig(batch_size=2, grad_accum=2, max_steps=3),
        plan=PlanConfig(device="h100-80gb"),
    )
    # 10 samples of 30 tokens = 300 tokens: packed, 3 rows of 100 (10/3 samples a row), 4 rows a step
    samples = [{"input_ids": list(range(30)), "labels": list(range(30))} for _ in range(10)]
    plan = start_plan(cfg, None, samples, 3, 2, False)
    r = plan["run"]
    assert (r["rows_per_step"], r["tokens_per_step"], r["packing"]) == (4, 400, True)
    assert r["samples_per_step"] == pytest.approx(40 / 3)
    assert per_step_text(plan) == "4 rows x 100 tokens (packed) = ~13 samples, ~400 real tokens"
    assert per_step_short(plan) == "~13 samples (4 rows), ~400 tok/step"
    cfg.data.packing = False  # a padded row is one sample
    r = start_plan(cfg, None, samples, 3, 2, False)["run"]
    assert (r["rows_per_step"], r["samples_per_step"], r["tokens_per_step"]) == (4, 4, 120)


def test_progress_line_shows_what_a_step_holds():
    out = io.StringIO()
    bar = PlainProgress(out=out, clock=lambda: 0.0, per_step="~13 samples (4 rows), ~400 tok/step")
    task = bar.add_task("train", total=10, loss=float("nan"), lr=1e-3, tps=0.0)
    bar.update(task, loss=1.5, tps=420.0)
    bar.update(task, completed=1, lr=1e-3)
    assert "420 tok/s  ~13 samples (4 rows), ~400 tok/step  eta" in out.getvalue()


def test_comparison_flags_figures_off_by_more_than_15_percent():
    plan = {
        "time": {"tokens_per_s": 100.0, "expected_mfu": 0.3, "total_s": 10.0, "peak_flops": 1e11},
        "memory": {"peak": 1000},
    }
    done = compare_measured(plan, {"tokens_per_s": 114.0, "peak_memory_bytes": 1200, "mfu": 0.31})
    checks = {r["metric"]: r["within_15pct"] for r in done["comparison"]}
    assert checks == {"tokens_per_s": True, "peak_memory_bytes": False, "mfu": None, "wall_time_s": None}
    Console(file=io.StringIO()).print(json.dumps(done))  # serialisable


def test_cpu_plans_compare_the_resident_peak_with_the_measured_rss():
    # a step's activations (2 GiB of them) freed and kept resident by malloc while the next step allocates
    mem = {"peak": 3 * 2**30, "weights": 2**30, "activations_layers": 3 * 2**29, "activations_logits": 2**29}
    host = host_memory(mem)
    assert host["allocator_retained"] == int(2 * 2**30 * HOST_RETAINED)
    assert host["resident_peak"] == 3 * 2**30 + host["allocator_retained"]
    plan = {
        "time": {"tokens_per_s": 100.0, "expected_mfu": 0.3, "total_s": 10.0},
        "memory": {**mem, **host},
    }
    row = compare_measured(plan, {"peak_memory_bytes": host["resident_peak"]})["comparison"][2]
    assert row["metric"] == "peak_memory_bytes" and row["ratio"] == 1.0
