"""plan.json for a run: the planner's prediction before training, the measurement after, side by side."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tunesmith.config import Config, TrainConfig
from tunesmith.data.pack import epoch_batches
from tunesmith.plan import compare_measured, make_plan


def total_steps(tc: TrainConfig, batches_per_epoch: int, micro_per_step: int) -> int:
    """train.max_steps, else enough optimizer steps for train.epochs passes over the micro-batches."""
    return tc.max_steps or max(1, -(-int(tc.epochs * batches_per_epoch) // micro_per_step))


def plan_for_data(cfg: Config, samples: list[dict], world: int = 1) -> dict:
    """The plan of `cfg` with the real token counts and step count of these training samples."""
    lengths = [len(s["input_ids"]) for s in samples]
    per_epoch = len(epoch_batches(lengths, cfg.train.batch_size, cfg.data.max_length, cfg.data.packing, 0, 0))
    micro = cfg.train.grad_accum * world
    return start_plan(cfg, None, samples, total_steps(cfg.train, per_epoch, micro), micro, False)


def start_plan(cfg: Config, run: Path | None, samples: list[dict], total_steps: int, micro_per_step: int, is_main: bool) -> dict:
    """Predict FLOPs / memory / time for the steps this run will take, with the data's real token counts."""
    tokens = sum(len(s["input_ids"]) for s in samples)
    if samples:
        # Packed rows are nearly full; padded rows hold one sample each (real tokens only count for speed).
        rows = len(samples) if not cfg.data.packing else max(1, -(-tokens // cfg.data.max_length))
        tokens_per_step = int(tokens / rows * cfg.train.batch_size * micro_per_step)
    else:  # a streamed corpus: every row is a full max_length block
        tokens_per_step = cfg.train.batch_size * cfg.data.max_length * micro_per_step
    planned = cfg.model_copy(deep=True)
    planned.train.max_steps = total_steps
    plan = make_plan(planned, tokens_per_step=tokens_per_step)
    if is_main and run is not None:
        (run / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
    return plan


def mfu(plan: dict, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: model FLOPs/token x tokens/s over the device peak the planner measured."""
    peak = plan["time"].get("peak_flops")
    return tokens_per_s * plan["flops"]["model"] / peak if peak else None


def peak_memory_bytes(dev: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def finish_plan(plan: dict, run: Path, tokens: int, train_seconds: float, wall_seconds: float, dev: torch.device) -> dict:
    """Fill the measured side of plan.json and print predicted vs measured."""
    tps = tokens / max(train_seconds, 1e-9)
    measured = {"tokens_per_s": tps, "mfu": mfu(plan, tps), "peak_memory_bytes": peak_memory_bytes(dev),
                "wall_time_s": train_seconds, "run_wall_s": wall_seconds}
    full = compare_measured(plan, measured)
    (run / "plan.json").write_text(json.dumps(full, indent=2, default=str))
    table = Table(title="plan vs measured", header_style="bold")
    for col in ("", "predicted", "measured", "measured/predicted"):
        table.add_column(col, justify="right")
    for row in full["comparison"]:
        fmt = _fmt_bytes if "bytes" in row["metric"] else _fmt_num
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        table.add_row(row["metric"], fmt(row["predicted"]), fmt(row["measured"]), ratio)
    Console().print(table)
    return full["comparison"]


def _fmt_num(x) -> str:
    return "-" if x is None else f"{x:,.3g}" if abs(x) < 1 else f"{x:,.1f}"


def _fmt_bytes(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"
