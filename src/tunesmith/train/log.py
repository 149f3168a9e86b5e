"""Where training reports go: metrics.jsonl, an optional TensorBoard writer, a Rich progress bar, the loss PNG."""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tunesmith.config import UserError


class NullWriter:
    """Stands in for TensorBoard when it is off (and on ranks other than 0)."""

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(run_dir: Path, enabled: bool):
    """A SummaryWriter under <run>/tensorboard, or a NullWriter."""
    if not enabled:
        return NullWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "train.report_to=[tensorboard] needs the tensorboard package (pip install 'tunesmith[tensorboard]')"
        ) from None
    return SummaryWriter(str(run_dir / "tensorboard"))


class MetricsLog:
    """Appends one JSON object per logged step / eval to metrics.jsonl and mirrors scalars to `writer`."""

    def __init__(self, path: Path, writer, enabled: bool = True):
        self.path, self.writer, self.enabled = path, writer, enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])


def rewind(path: Path, step: int) -> int:
    """Resuming from a checkpoint at `step`: rows logged after it (steps about to be redone) and any line cut
    short by a kill move from metrics.jsonl to metrics.rewound.jsonl, so each step is logged once; returns
    how many moved."""
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            later = row["step"] > step
        except (ValueError, KeyError, TypeError):
            later = True  # half a row (SIGKILL mid-write): kept aside, not appended to
        (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(path.with_name("metrics.rewound.jsonl"), "a") as f:
            f.writelines(moved)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return len(moved)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows (empty if missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(enabled: bool) -> Progress:
    """step/total, loss, lr, real tokens/s (metrics.jsonl's tokens_per_s of the last log) and ETA; disabled bars
    print nothing (other ranks, tests)."""
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} real tok/s"
        ),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def plot_losses(rows: list[dict], out: Path) -> Path | None:
    """Train and eval loss against step as a PNG (None if nothing was logged)."""
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and "loss" in r]
    evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval" and "loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per label token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
