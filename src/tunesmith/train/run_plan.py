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
from tunesmith.plan.devices import DEVICES, remeasure_peak_flops
from tunesmith.plan.estimate import make_plan
from tunesmith.plan.history import record_run
from tunesmith.runtime import peak_memory_since, print0
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
    rows_per_step = cfg.train.batch_size * micro_per_step
    samples_per_step = None  # a streamed corpus: rows are cut from running text, not samples
    if samples:
        # Packed rows are nearly full; padded rows hold one sample each (real tokens only count for speed).
        rows = len(samples) if not cfg.data.packing else max(1, -(-tokens // cfg.data.max_length))
        tokens_per_step = int(tokens / rows * rows_per_step)
        samples_per_step = len(samples) / rows * rows_per_step
    else:  # a streamed corpus: every row is a full max_length block
        tokens_per_step = rows_per_step * cfg.data.max_length
    planned = cfg.model_copy(deep=True)
    planned.train.max_steps = steps
    plan = make_plan(
        planned,
        tokens_per_step=tokens_per_step,
        label_fraction=label_fraction(samples),
        samples_per_step=samples_per_step,
    )
    plan["run"]["rows_per_step"] = rows_per_step  # all processes' rows
    if budget is not None:
        plan["budget"] = budget
    if is_main and run is not None:
        (run / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
        print0(f"per step: {per_step_text(plan)}; peak {peak_text(plan['time'])}")
    return plan


def per_step_text(plan: dict) -> str:
    """What one optimizer step holds: `8 rows x 160 tokens (packed) = ~14 samples, ~1,105 tokens`.

    train.batch_size counts rows; with data.packing a row of max_length tokens holds several samples, so
    ~14 samples/step here is what another tool's per_device_train_batch_size x accumulation would call 14.
    """
    r = plan["run"]
    rows = r.get("rows_per_step", r["micro_batch"] * r["grad_accum"])
    packed = " (packed)" if r.get("packing") else ""
    samples = r.get("samples_per_step")
    what = f"~{samples:.0f} samples, " if samples is not None else ""
    return f"{rows} rows x {r['seq_len']} tokens{packed} = {what}~{r['tokens_per_step']:,} real tokens"


def per_step_short(plan: dict) -> str:
    """The progress line's part of per_step_text: `~14 samples (8 rows), ~1,105 tok/step`."""
    r = plan["run"]
    rows = r.get("rows_per_step", r["micro_batch"] * r["grad_accum"])
    samples = r.get("samples_per_step")
    if samples is None:
        return f"{rows} rows, ~{r['tokens_per_step']:,} tok/step"
    return f"~{samples:.0f} samples ({rows} rows), ~{r['tokens_per_step']:,} tok/step"


def peak_text(t: dict) -> str:
    """The peak MFU is over and its source: `113.0 GFLOP/s, measured now (2026-12-02 14:00 UTC)`."""
    return f"{t['peak_flops'] / 1e9:,.1f} GFLOP/s, {t.get('peak_source', 'measured')}"


def mfu(plan: dict, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: model FLOPs/token x tokens/s over the device peak; never above 1.

    Above 1 the peak is wrong (timed while the machine was busy): it is timed again once, the plan's peak
    raised and the warning printed; still above 1 (the peak or the FLOPs per token are off), 1.0 is reported
    with a warning, and plan.json's time.mfu_clamped says so.
    """
    t = plan["time"]
    if not t.get("peak_flops"):
        return None
    value = tokens_per_s * plan["flops"]["model"] / t["peak_flops"]
    if value <= 1.0:
        return value
    if "peak_flops_at_start" not in t:  # the first reading above 1: time the peak again, once per run
        old = t["peak_flops_at_start"] = t["peak_flops"]
        t["peak_flops"] = max(old, _retime_peak(t))
        if t["peak_flops"] > old:
            was = peak_text({**t, "peak_flops": old})
            t["peak_source"] = f"timed again during the run: MFU read {value:.2f} against {was}"
        print0(
            f"warning: MFU {value:.2f} > 1 means the peak FLOP/s was too low (timed under load?); timed "
            f"again: {old / 1e9:,.1f} G -> {t['peak_flops'] / 1e9:,.1f} G"
        )
        value = tokens_per_s * plan["flops"]["model"] / t["peak_flops"]
        if value <= 1.0:
            return value
    if not t.get("mfu_clamped"):
        t["mfu_clamped"] = True
        print0(
            f"warning: MFU {value:.2f} > 1 even against a peak timed again ({peak_text(t)}): the peak or the "
            "FLOPs per token are wrong; MFU is reported as 1.0 (plan.json time.mfu_clamped)"
        )
    return 1.0


def _retime_peak(t: dict) -> float:
    """This machine's peak timed again now, for plan time section `t`; a named GPU's datasheet stays as is."""
    if t["device"] in DEVICES or (t["device"] != "cpu" and not torch.cuda.is_available()):
        return t["peak_flops"]
    dev = torch.device("cpu" if t["device"] == "cpu" else "cuda")
    return remeasure_peak_flops(dev, bf16=t.get("autocast") == "bf16")


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
        # what MFU is over (raised during the run if it read above 1)
        "peak_flops": plan["time"]["peak_flops"],
    }
    if plan["time"].get("mfu_clamped"):
        measured["mfu_unclamped"] = tps * plan["flops"]["model"] / plan["time"]["peak_flops"]
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
        if row.get("within_15pct") is False:
            ratio = f"[yellow]{ratio} (off by > {TOLERANCE:.0%})"
        table.add_row(
            LABELS.get(row["metric"], row["metric"]), fmt(row["predicted"]), fmt(row["measured"]), ratio
        )
    notes = [f"MFU over a peak of {peak_text(plan['time'])}"]
    if "process_bytes_before_model" in measured:
        notes.append(
            f"CPU memory: peak RSS minus the {_fmt_bytes(measured['process_bytes_before_model'])} held "
            "before the model; predicted: tensors + what malloc keeps resident (memory.allocator_retained)"
        )
    table.caption = "\n".join(notes)
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
        # CPU runs are measured as resident memory: the plan's resident peak (plan/memory.host_memory)
        "peak_memory_bytes": plan["memory"].get("resident_peak", plan["memory"]["peak"]),
        "wall_time_s": plan["time"]["total_s"],
    }
    rows = []
    for key, pred in predicted.items():
        got = measured.get(key)
        ratio = got / pred if got is not None and pred else None
        ok = abs(ratio - 1) <= TOLERANCE if ratio is not None and key in CHECKED else None
        rows.append({"metric": key, "predicted": pred, "measured": got, "ratio": ratio, "within_15pct": ok})
    return {**plan, "measured": dict(measured), "comparison": rows}


# The figures a plan is held to: measured within TOLERANCE of predicted (on a busy shared CPU the speed alone
# varies ~25% from hour to hour; a dedicated machine should stay inside)
CHECKED = ("tokens_per_s", "peak_memory_bytes")
TOLERANCE = 0.15


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
        ("per step (train.batch_size counts rows)", per_step_text(plan)),
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
        ("peak FLOP/s (MFU is over it)", peak_text(t)),
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
