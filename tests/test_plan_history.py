"""Plan history: finished runs' measured MFU becomes the MFU the next plan on this machine assumes."""

import copy
import io
import json

import pytest
import torch
from rich.console import Console

import tunesmith.plan.devices
import tunesmith.plan.history
from tests import tiny
from tunesmith.config import Config, ModelConfig, PlanConfig, TrainConfig, load_config
from tunesmith.plan.estimate import make_plan
from tunesmith.plan.history import cpu_name, history_path, read_history, record_run
from tunesmith.train.run_plan import print_plan

PEAK = 1e11  # FLOP/s this "machine" calibrates to, so tokens/s is peak x MFU / FLOPs per token by hand


@pytest.fixture
def cpu_machine(tmp_path, monkeypatch):
    """A CPU-only machine with a fixed peak; the cache root (HOME) and so the history live in tmp_path."""
    import tunesmith.runtime

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(
        "TUNESMITH_PLAN_HISTORY", str(tmp_path / ".cache" / "tunesmith" / "plan_history.jsonl")
    )
    monkeypatch.setattr(tunesmith.runtime, "device", lambda dist=None: torch.device("cpu"))
    monkeypatch.setattr(tunesmith.runtime, "fast_bf16", lambda dev: False)
    monkeypatch.setattr(tunesmith.plan.devices, "calibrated_peak_flops", lambda dev, bf16=False: PEAK)
    return tiny.save_model_dir(tmp_path / "m")


def plan_for(model_dir, **plan_over) -> dict:
    return make_plan(
        Config(
            model=ModelConfig(name=str(model_dir)),
            train=TrainConfig(max_steps=3, precision="fp32"),
            plan=PlanConfig(**plan_over),
        )
    )


def record(plan: dict, mfu: float, seconds: float = 120.0, device_type: str = "cpu") -> dict | None:
    measured = {"tokens_per_s": mfu * PEAK / plan["flops"]["model"], "mfu": mfu, "wall_time_s": seconds}
    return record_run(plan, measured, "runs/x", device_type)


def test_no_history_assumes_the_default(cpu_machine):
    plan = plan_for(cpu_machine)
    t = plan["time"]
    assert t["expected_mfu"] == 0.35 and t["mfu_source"].startswith("assumed (default 0.35")
    assert t["tokens_per_s"] == pytest.approx(PEAK * 0.35 / plan["flops"]["model"])


def test_two_runs_make_the_median_and_move_tokens_per_s(cpu_machine):
    first = plan_for(cpu_machine)
    assert record(first, 0.10)["measured_mfu"] == 0.10
    assert record(first, 0.20)["machine"] == cpu_name()
    plan = plan_for(cpu_machine)
    t = plan["time"]
    assert t["expected_mfu"] == pytest.approx(0.15)  # median of 0.10 and 0.20
    assert (
        t["mfu_source"] == f"measured: median of 2 runs on this machine ({cpu_name()}, fp32, full, gpt_neox)"
    )
    assert t["tokens_per_s"] == pytest.approx(first["time"]["tokens_per_s"] * 0.15 / 0.35)
    assert t["step_s"] == pytest.approx(first["time"]["step_s"] * 0.35 / 0.15)


def test_only_the_last_five_runs_count(cpu_machine):
    plan = plan_for(cpu_machine)
    for mfu in (0.9, 0.9, 0.1, 0.2, 0.3, 0.4, 0.5):
        record(plan, mfu)
    assert plan_for(cpu_machine)["time"]["expected_mfu"] == pytest.approx(0.3)  # median of 0.1 .. 0.5


def test_other_machines_and_autocasts_are_not_used(cpu_machine):
    plan = plan_for(cpu_machine)
    gpu = copy.deepcopy(plan)
    gpu["time"]["device"] = "NVIDIA A100-SXM4-80GB"
    bf16 = copy.deepcopy(plan)
    bf16["time"]["autocast"] = "bf16"
    record(gpu, 0.5, device_type="cuda")
    record(bf16, 0.6)
    assert len(read_history()) == 2
    assert plan_for(cpu_machine)["time"]["expected_mfu"] == 0.35


def test_same_machine_other_model_is_the_weaker_match(cpu_machine):
    plan = plan_for(cpu_machine)
    lora = copy.deepcopy(plan)
    lora["run"]["lora"] = True
    record(lora, 0.05)
    weak = plan_for(cpu_machine)["time"]
    assert weak["expected_mfu"] == 0.05
    assert weak["mfu_source"].endswith(f"({cpu_name()}, fp32, any model within 4x the size)")
    record(plan, 0.25)  # a full fine-tune of this model type: the better match wins over the LoRA run
    assert plan_for(cpu_machine)["time"]["expected_mfu"] == 0.25


def test_runs_of_a_model_of_another_size_are_not_used(cpu_machine):
    plan = plan_for(cpu_machine)
    for factor, mfu in ((5, 0.5), (1 / 5, 0.01), (4, 0.2), (1 / 4, 0.1)):  # 5x apart: out; 4x apart: in
        other = copy.deepcopy(plan)
        other["model"]["total"] = int(plan["model"]["total"] * factor)
        record(other, mfu)
    assert plan_for(cpu_machine)["time"]["expected_mfu"] == pytest.approx(0.15)  # median of 0.2 and 0.1


def test_a_corrupt_line_is_skipped(cpu_machine):
    plan = plan_for(cpu_machine)
    record(plan, 0.2)
    with history_path().open("ab") as f:  # a cut-off write, not an object, not a number, not UTF-8
        f.write(b'{"machine": "cut short by a kill\n[1, 2]\n\n{"measured_mfu": "fast"}\n\xff\xfe\n')
    record(plan, 0.4)
    assert [r["measured_mfu"] for r in read_history()] == [0.2, 0.4]
    assert plan_for(cpu_machine)["time"]["expected_mfu"] == pytest.approx(0.3)


def test_an_explicit_expected_mfu_wins(cpu_machine):
    record(plan_for(cpu_machine), 0.1)
    t = plan_for(cpu_machine, expected_mfu=0.5)["time"]
    assert t["expected_mfu"] == 0.5 and t["mfu_source"] == "assumed (plan.expected_mfu)"


def test_short_runs_and_named_device_plans_are_not_recorded(cpu_machine):
    assert record(plan_for(cpu_machine), 0.2, seconds=59.0) is None  # mostly warm-up
    assert record(plan_for(cpu_machine, device="h100-80gb"), 0.2) is None  # MFU of another device's peak
    assert not history_path().exists()


def test_print_plan_shows_the_mfu_source(cpu_machine):
    record(plan_for(cpu_machine), 0.2)
    out = io.StringIO()
    print_plan(plan_for(cpu_machine), Console(file=out, width=300))
    assert "MFU measured: median of 1 run on this machine" in out.getvalue()


def test_a_finished_run_writes_one_history_line(cpu_machine, tmp_path, qa_file, monkeypatch):
    from tunesmith.train.loop import train

    monkeypatch.setattr(tunesmith.plan.history, "MIN_TRAIN_SECONDS", 0.0)  # a tiny run takes a second
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.name={cpu_machine}",
            f"data.path={qa_file}",
            f"out_dir={run}",
            "data.test_size=4",
            "data.max_length=64",
            "train.batch_size=4",
            "train.max_steps=3",
            "train.precision=fp32",
        ],
    )
    train(cfg)
    plan = json.loads((run / "plan.json").read_text())
    (line,) = read_history()
    assert line["measured_tokens_per_s"] == pytest.approx(plan["measured"]["tokens_per_s"])
    assert line["measured_mfu"] == pytest.approx(plan["measured"]["mfu"])
    assert line["predicted_mfu"] == 0.35 and line["run_dir"] == str(run)
    assert (line["method"], line["model_type"], line["autocast"]) == ("full", "gpt_neox", "fp32")
    assert (line["steps"], line["micro_batch"], line["seq_len"], line["world"]) == (3, 4, 64, 1)
