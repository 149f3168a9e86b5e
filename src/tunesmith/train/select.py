"""Which eval point is the best so far, and when to stop early: pure functions over one small record.

`train.select` names the metric, `train.select_mode` its direction (auto: lower is better for losses and
perplexities, higher for everything else). An eval improves on the best only by more than
`train.early_stop_min_delta`; that one rule moves best/ and resets the patience count, so "best" and
"no progress" never disagree. The record travels in each checkpoint's cursor, so an exact resume keeps
both the best value and the count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from tunesmith.eval.summary import minimized

# train.select name -> the key of evaluate_loss's result that holds it
LOSS_METRICS = {"eval_loss": "loss", "eval_ppl": "perplexity"}
KNOWN = (*LOSS_METRICS, "probe_recall", "probe_em")  # the probe: train/evals.py


def direction(metric: str, mode: str) -> str:
    """'min' or 'max': `mode` when given, else the metric's own direction (eval/summary.py's one rule)."""
    return "min" if minimized(metric, mode) else "max"


@dataclass(frozen=True)
class Selection:
    """The best eval so far (value None until the first eval) and evals since it last improved."""

    metric: str
    mode: str  # min | max (resolved, never auto)
    min_delta: float = 0.0
    patience: int = 0  # 0: never stop early
    value: float | None = None
    step: int | None = None
    epoch: float | None = None
    stale: int = 0  # evals in a row that did not improve by more than min_delta
    evals: int = 0

    def to_dict(self) -> dict:
        """Plain JSON for the checkpoint cursor."""
        return asdict(self)


def start(metric: str, mode: str, min_delta: float, patience: int, saved: dict | None = None) -> Selection:
    """A fresh selection, or the one a checkpoint saved (when its metric and direction are still the same)."""
    fresh = Selection(metric, direction(metric, mode), min_delta, patience)
    if not saved or saved.get("metric") != fresh.metric or saved.get("mode") != fresh.mode:
        return (
            fresh  # a resume that changed train.select starts the count over: old values mean another thing
        )
    return replace(
        fresh,
        value=saved.get("value"),
        step=saved.get("step"),
        epoch=saved.get("epoch"),
        stale=int(saved.get("stale", 0)),
        evals=int(saved.get("evals", 0)),
    )


def better(sel: Selection, value: float) -> bool:
    """Whether `value` beats the best by more than min_delta (the first finite value always does)."""
    if not math.isfinite(value):
        return False
    if sel.value is None:
        return True
    if sel.mode == "min":
        return value < sel.value - sel.min_delta
    return value > sel.value + sel.min_delta


def observe(sel: Selection, value: float, step: int, epoch: float | None) -> tuple[Selection, bool]:
    """The selection after an eval at `step` scored `value`, and whether that eval is the new best."""
    if better(sel, value):
        return replace(sel, value=value, step=step, epoch=epoch, stale=0, evals=sel.evals + 1), True
    return replace(sel, stale=sel.stale + 1, evals=sel.evals + 1), False


def should_stop(sel: Selection) -> bool:
    """Patience is on and that many evals in a row did not improve."""
    return sel.patience > 0 and sel.stale >= sel.patience


def stop_reason(sel: Selection) -> str:
    """One line for the log and the manifest."""
    return (
        f"{sel.metric} did not improve by more than {sel.min_delta:g} for {sel.stale} evals "
        f"(train.early_stop_patience={sel.patience}); best {sel.value:.6g} at step {sel.step}"
    )


def metric_value(sel: Selection, metrics: dict) -> float:
    """The selected metric out of one eval's results (keys as metrics.jsonl's eval rows name them)."""
    value = metrics.get(LOSS_METRICS.get(sel.metric, sel.metric))
    return (
        float(value) if value is not None else math.nan
    )  # e.g. a probe with no number to recall: never best


def best_info(sel: Selection, results: dict) -> dict:
    """best.json: the step and epoch kept, the metric, its value and direction, and that eval's results."""
    return {
        "step": sel.step,
        "epoch": sel.epoch,
        "metric": sel.metric,
        "value": sel.value,
        "mode": sel.mode,
        "min_delta": sel.min_delta,
        "eval": results,
    }


def format_curve(evals: list[dict], sel: Selection, best_dir: object) -> str:
    """The held-out curve as a small table (metrics.jsonl eval rows), the kept step marked '<- best'.

    A last eval over more examples than the periodic ones (train.eval_limit) is shown on the periodic ones'
    examples, like every other row, and its all-examples numbers on a line of their own."""
    compared = [row.get("eval_limit", row) for row in evals]
    examples = {row.get("examples") for row in compared}
    over = f" over {examples.pop()} held-out examples" if len(examples) == 1 and None not in examples else ""
    extra = sel.metric if sel.metric not in LOSS_METRICS else None  # the probe's metric, when it selects
    head = f"{'step':>7} {'epoch':>6} {'eval_loss':>10} {'eval_ppl':>9}" + (f" {extra:>13}" if extra else "")
    lines = [f"held-out curve{over}:", head]
    for row, c in zip(evals, compared):
        epoch = f"{row['epoch']:.2f}" if isinstance(row.get("epoch"), (int, float)) else "-"
        cells = f"{row['step']:>7} {epoch:>6} {c['loss']:>10.4f} {c['perplexity']:>9.3f}"
        if extra:
            cells += f" {row[extra]:>13.3f}" if isinstance(row.get(extra), (int, float)) else f" {'-':>13}"
        mark = f"  <- best ({sel.metric}, kept in {best_dir})" if row["step"] == sel.step else ""
        lines.append(cells + mark)
    last = evals[-1]
    if "eval_limit" in last:
        lines.append(
            f"final eval over all {last['examples']} held-out examples: eval_loss {last['loss']:.4f}, "
            f"eval_ppl {last['perplexity']:.3f}"
        )
    return "\n".join(lines)
