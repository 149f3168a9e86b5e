"""A run's plan.json: the planner's prediction from the run's real data before training, the measurement
after (real tokens/s, MFU, peak memory), compared side by side and printed; also how `tunesmith plan` prints a
plan."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tunesmith.config import Config, UserError
from tunesmith.data.pack import epoch_batches
from tunesmith.model.loss import label_fraction
from tunesmith.plan.estimate import make_plan
from tunesmith.plan.history import record_run
from tunesmith.runtime import peak_memory_since
from tunesmith.train.optim import total_steps


def plan_for_data(cfg: Config, samples: list[dict], world: int = 1) -> dict:
    """The plan of `cfg` with the real token counts and step count of these training samples."""
    lengths = [len(s["input_ids"]) for s in samples]
    per_epoch = len(epoch_batches(lengths, cfg.train.batch_size, cfg.data.max_length, cfg.data.packing, 0, 0))
    micro = cfg.train.grad_accum * world
    return start_plan(cfg, None, samples, total_steps(cfg.train, per_epoch, micro), micro, False)


def start_plan(
    cfg: Config,
    run: Path | None,
    samples: list[dict],
    steps: int,
    micro_per_step: int,
    is_main: bool,
    budget: dict | None = None,
) -> dict:
    """Predict FLOPs / memory / time for the steps this run will take, with the data's real token counts;
    `budget`: train.time_budget's sizing (train/budget.py), kept as plan.json's "budget" section."""
    tokens = sum(len(s["input_ids"]) for s in samples)
    if samples:
        # Packed rows are nearly full; padded rows hold one sample each (real tokens only count for speed).
        rows = len(samples) if not cfg.data.packing else max(1, -(-tokens // cfg.data.max_length))
        tokens_per_step = int(tokens / rows * cfg.train.batch_size * micro_per_step)
    else:  # a streamed corpus: every row is a full max_length block
        tokens_per_step = cfg.train.batch_size * cfg.data.max_length * micro_per_step
    planned = cfg.model_copy(deep=True)
    planned.train.max_steps = steps
    plan = make_plan(planned, tokens_per_step=tokens_per_step, label_fraction=label_fraction(samples))
    if budget is not None:
        plan["budget"] = budget
    if is_main and run is not None:
        (run / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
    return plan


def mfu(plan: dict, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: model FLOPs/token x tokens/s over the device peak the planner measured."""
    peak = plan["time"].get("peak_flops")
    return tokens_per_s * plan["flops"]["model"] / peak if peak else None


def peak_memory_bytes(dev: torch.device, before_model: int | None = None) -> int:
    """Training's peak memory: the CUDA allocator peak on GPU; on CPU peak RSS above the RSS before the model.

    The planner predicts tensor bytes; on CPU the process also holds Python, the libraries and the data, so
    the RSS when the model started loading (`before_model`, from `reset_peak_rss()`, which also restarted the
    peak there) is taken off. Without it: the process's lifetime peak RSS.
    """
    if dev.type != "cuda" and before_model is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak_memory_since(dev, 0 if dev.type == "cuda" else before_model)


def finish_plan(
    plan: dict,
    run: Path,
    tokens: int,
    train_seconds: float,
    wall_seconds: float,
    dev: torch.device,
    before_model: int | None = None,
) -> dict:
    """Fill the measured side of plan.json and print predicted vs measured."""
    tps = tokens / max(train_seconds, 1e-9)
    measured = {
        "tokens_per_s": tps,
        "mfu": mfu(plan, tps),
        "peak_memory_bytes": peak_memory_bytes(dev, before_model),
        "wall_time_s": train_seconds,
        "run_wall_s": wall_seconds,
    }
    if dev.type != "cuda" and before_model is not None:
        measured["process_bytes_before_model"] = before_model  # Python, libraries, data: not in the plan
    full = compare_measured(plan, measured)
    (run / "plan.json").write_text(json.dumps(full, indent=2, default=str))
    # loop.py calls this on the main process of a finished run only (a signal or divergence exits before)
    record_run(full, measured, run, dev.type)
    table = Table(
        title="plan vs measured (measured: mean over this run's training steps)", header_style="bold"
    )
    for col in ("", "predicted", "measured", "measured/predicted"):
        table.add_column(col, justify="right")
    for row in full["comparison"]:
        fmt = _fmt_bytes if "bytes" in row["metric"] else _fmt_num
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        table.add_row(
            LABELS.get(row["metric"], row["metric"]), fmt(row["predicted"]), fmt(row["measured"]), ratio
        )
    if "process_bytes_before_model" in measured:
        table.caption = (
            f"CPU memory: peak RSS minus the {_fmt_bytes(measured['process_bytes_before_model'])} "
            "held before the model; RSS also keeps memory the allocator cached after frees "
            "(the plan counts tensors)"
        )
    Console().print(table)
    return full["comparison"]


# What each compared figure counts, as the tables name it. tokens/s everywhere (plan, metrics.jsonl, the
# progress bar) is real tokens: prompt and answer tokens, no padding.
LABELS = {
    "tokens_per_s": "real tokens/s (training steps)",
    "mfu": "MFU",
    "peak_memory_bytes": "peak memory",
    "wall_time_s": "training-step time (s)",
}


def _fmt_num(x) -> str:
    return "-" if x is None else f"{x:,.3g}" if abs(x) < 1 else f"{x:,.1f}"


def _fmt_bytes(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def compare_measured(plan: dict, measured: dict) -> dict:
    """The plan with the measured side filled in and a predicted-vs-measured table (ratio measured/predicted).

    `measured` keys (any subset): tokens_per_s, mfu, peak_memory_bytes, wall_time_s.
    """
    predicted = {
        "tokens_per_s": plan["time"]["tokens_per_s"],
        "mfu": plan["time"]["expected_mfu"],
        "peak_memory_bytes": plan["memory"]["peak"],
        "wall_time_s": plan["time"]["total_s"],
    }
    rows = []
    for key, pred in predicted.items():
        got = measured.get(key)
        ratio = got / pred if got is not None and pred else None
        rows.append({"metric": key, "predicted": pred, "measured": got, "ratio": ratio})
    return {**plan, "measured": dict(measured), "comparison": rows}


def plan_from_run(run_dir: str | Path) -> dict:
    """The plan.json a run wrote (predicted and, once finished, measured)."""
    path = Path(run_dir) / "plan.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no plan.json (not a tunesmith run dir, or training has not started)")
    return json.loads(path.read_text())


def print_plan(plan: dict, console) -> None:
    """Rich tables: model and FLOPs, memory breakdown, fit per device, time, what-can-I-run, measured."""
    from rich.table import Table

    m, r, f, t = plan["model"], plan["run"], plan["flops"], plan["time"]
    head = Table(
        title=f"plan: {m['name']} ({m['model_type']}, d={m['hidden']}, L={m['layers']}, V={m['vocab']})"
    )
    head.add_column("quantity")
    head.add_column("value", justify="right")
    for k, v in [
        ("parameters", f"{m['total']:,}"),
        ("trainable", f"{m['trainable']:,}"),
        ("micro-batch x seq x accum", f"{r['micro_batch']} x {r['seq_len']} x {r['grad_accum']}"),
        ("positions with a label (LM head runs there)", f"{r.get('label_fraction', 1.0):.0%}"),
        (
            "FLOPs/token fwd / bwd / recompute",
            f"{f['forward']:.3g} / {f['backward']:.3g} / {f['recompute']:.3g}",
        ),
        ("FLOPs/step (hardware)", f"{f['per_step']:.3g}"),
        ("FLOPs total", "-" if f["total"] is None else f"{f['total']:.3g}"),
        (
            "time/step",
            f"{t['step_s']:.3g} s at {t['expected_mfu']:.0%} MFU of {t['peak_flops'] / 1e12:.3g} TFLOP/s "
            f"({t['device']}, {t.get('autocast', 'fp32')} matmuls); MFU {t.get('mfu_source', 'assumed')}",
        ),
        ("real tokens/s (no padding)", f"{t['tokens_per_s']:,.0f}"),
        ("total time", "-" if t["total_s"] is None else f"{t['total_s'] / 60:.1f} min"),
    ]:
        head.add_row(k, v)
    console.print(head)
    mem = Table(title=f"training memory on {plan['memory']['device']}")
    mem.add_column("part")
    mem.add_column("bytes", justify="right")
    for k, v in plan["memory"].items():
        if isinstance(v, int) and not isinstance(v, bool) and k not in ("max_micro_batch",):
            mem.add_row(k, _fmt_bytes(v))
    mem.add_row("fits / max micro-batch", f"{plan['memory']['fits']} / {plan['memory']['max_micro_batch']}")
    console.print(mem)
    fit = Table(title="fit per device (this config)")
    for col in ("device", "needed", "capacity", "fits", "max micro-batch"):
        fit.add_column(col)
    for row in plan["fit"]:
        fit.add_row(
            row["device"],
            _fmt_bytes(row["needed_bytes"]),
            _fmt_bytes(row["capacity_bytes"]),
            "yes" if row["fits"] else "no",
            str(row["max_micro_batch"]),
        )
    console.print(fit)
    run = Table(title=f"what can I run on {t['device']} (1 row x 1024 tokens, checkpointing)")
    for col in ("model", "params", "inference", "lora", "qlora", "full"):
        run.add_column(col)
    for row in plan["what_can_i_run"]:
        cells = [
            ("[green]" if row["fits"][k] else "[red]") + _fmt_bytes(row[k])
            for k in ("inference", "lora", "qlora", "full")
        ]
        run.add_row(row["model"], f"{row['params'] / 1e9:.2f}B", *cells)
    console.print(run)
    if plan.get("comparison"):
        cmp = Table(title="predicted vs measured")
        for col in ("metric", "predicted", "measured", "measured/predicted"):
            cmp.add_column(col)
        for row in plan["comparison"]:
            cmp.add_row(
                LABELS.get(row["metric"], row["metric"]),
                *(
                    "-" if v is None else f"{v:.4g}"
                    for v in (row["predicted"], row["measured"], row["ratio"])
                ),
            )
        console.print(cmp)
