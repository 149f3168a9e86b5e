"""Plan history: the MFU finished runs measured on this machine, so the next plan assumes that, not a guess.

One JSON line per finished training segment in cache_root()/plan_history.jsonl (beside peak_flops.json);
`plan_mfu` turns the latest matching lines into the MFU a plan assumes when plan.expected_mfu is unset.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

from tunesmith.config import Config
from tunesmith.model.resolve import cache_root
from tunesmith.runtime import dist_info, print0

DEFAULT_MFU = 0.35  # assumed with no history: a typical well-fed GPU fine-tune; CPUs vary 0.1-0.6
LAST_N = 5  # the median of the latest runs: follows driver/torch upgrades, robust to one outlier
# A run shorter than this (seconds of training steps) is mostly warm-up (first-step allocations, kernel
# selection): its rate says little about the next real run (and test-suite runs stay out of the history).
MIN_TRAIN_SECONDS = 60.0
# MFU falls steeply as matmuls shrink (measured here: a 43k-parameter model at 0.0002 MFU where the peak
# allows 0.35): only runs of a model within this factor of the planned one's size say what it will reach.
SIZE_BAND = 4.0


def history_path() -> Path:
    """This machine's plan history file (the same cache folder as the peak FLOP/s calibration).

    TUNESMITH_PLAN_HISTORY names another file: the test suite points it at a temporary one, so runs made by
    tests never change the MFU later plans on the developer's machine assume."""
    override = os.environ.get("TUNESMITH_PLAN_HISTORY")
    return Path(override) if override else cache_root(None) / "plan_history.jsonl"


@functools.cache
def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo 'model name'), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform below
    return platform.processor() or platform.machine()


def machine_key(device_name: str) -> str:
    """What identifies this machine for a plan's device: the CPU model on "cpu", else the CUDA device name."""
    return cpu_name() if device_name == "cpu" else device_name


def method(lora: bool, quantize: str | None) -> str:
    """full, lora or qlora: what is trained (the plan's run.lora and run.quantize)."""
    return "full" if not lora else "qlora" if quantize else "lora"


def record_run(
    plan: dict, measured: dict, run_dir: Path | str, device_type: str, path: Path | None = None
) -> dict | None:
    """Append one finished segment (plan.json's predicted and measured side) to the history; the line or None.

    None (nothing written) when the plan was for a named device rather than this machine, the segment was
    shorter than MIN_TRAIN_SECONDS, or the file cannot be written (said on stdout; a finished run stands).
    """
    from tunesmith.plan.devices import DEVICES

    t, run, model = plan["time"], plan["run"], plan["model"]
    seconds = measured.get("wall_time_s") or 0.0
    if t["device"] in DEVICES or seconds < MIN_TRAIN_SECONDS or not measured.get("mfu"):
        return None
    entry = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_dir": str(run_dir),
        "machine": machine_key(t["device"]),
        "device_type": device_type,
        "autocast": t.get("autocast", "fp32"),
        "model": model["name"],
        "model_type": model["model_type"],
        "params": model["total"],
        "method": method(run["lora"], run.get("quantize")),
        "gradient_checkpointing": run["gradient_checkpointing"],
        "seq_len": run["seq_len"],
        "micro_batch": run["micro_batch"],
        "steps": run["steps"],
        # world > 1: tokens/s and MFU are the whole job's over one device's peak (plan_mfu uses world 1 only)
        "world": dist_info().world,
        "train_seconds": seconds,
        "predicted_tokens_per_s": t["tokens_per_s"],
        "predicted_mfu": t["expected_mfu"],
        "measured_tokens_per_s": measured["tokens_per_s"],
        "measured_mfu": measured["mfu"],
    }
    path = path or history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one write() of one line to an O_APPEND file: concurrent runs never interleave within a line
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        print0(f"note: plan history not updated ({path}: {e.strerror})")
        return None
    return entry


def read_history(path: Path | None = None) -> list[dict]:
    """The usable history lines, oldest first; a corrupt or incomplete line (a killed write) is skipped."""
    path = path or history_path()
    try:
        text = path.read_text(errors="replace")
    except OSError:  # no history yet (or unreadable): plans fall back to the assumed MFU
        return []
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        mfu = row.get("measured_mfu") if isinstance(row, dict) else None
        if isinstance(mfu, (int, float)) and math.isfinite(mfu) and mfu > 0:
            out.append(row)
    return out


def plan_mfu(
    cfg: Config, target: dict, model_type: str, params: int, path: Path | None = None
) -> tuple[float, str]:
    """The MFU a plan assumes and its source: plan.expected_mfu, else this machine's history, else 0.35.

    History: the median measured MFU of the last LAST_N single-process runs on this machine with the same
    device type, autocast, method (full/LoRA/QLoRA) and model_type; else of any model with the same autocast;
    either way of models within SIZE_BAND of `params` (total parameters).
    A plan for a named device (plan.device) is not for this machine: its history does not apply.
    """
    if cfg.plan.expected_mfu is not None:
        return cfg.plan.expected_mfu, "assumed (plan.expected_mfu)"
    if cfg.plan.device is not None:
        return (
            DEFAULT_MFU,
            f"assumed (default {DEFAULT_MFU}: planning for {cfg.plan.device}, not this machine)",
        )
    machine, autocast = machine_key(target["name"]), target["autocast"]
    device_type = "cuda" if target["cuda"] else "cpu"
    how = method(cfg.lora is not None, cfg.lora.quantize if cfg.lora else None)
    same = [
        r
        for r in read_history(path)
        if (r.get("machine"), r.get("device_type"), r.get("autocast"), r.get("world", 1))
        == (machine, device_type, autocast, 1)
        and params / SIZE_BAND <= (r.get("params") or 0) <= params * SIZE_BAND
    ]
    label = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}[how]
    strong = [r for r in same if (r.get("method"), r.get("model_type")) == (how, model_type)]
    for rows, what in (
        (strong, f"{label}, {model_type}"),
        (same, f"any model within {SIZE_BAND:g}x the size"),
    ):
        if rows:
            last = [r["measured_mfu"] for r in rows[-LAST_N:]]
            runs = f"{len(last)} run{'s' if len(last) > 1 else ''}"
            source = f"measured: median of {runs} on this machine ({machine}, {autocast}, {what})"
            return statistics.median(last), source
    return DEFAULT_MFU, f"assumed (default {DEFAULT_MFU}: no finished run measured on this machine yet)"
