"""Where training reports go: metrics.jsonl (fanned out to the trackers of train.report_to), the progress
display (a Rich bar on a terminal, plain periodic lines otherwise), the loss PNG."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from rich import get_console
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tunesmith.train.heartbeat import Heartbeat
from tunesmith.train.track import Tracker

# Plain progress lines (stdout not a terminal): at most one per this many seconds, so a 10-minute run prints
# about 40 lines however small train.log_every is, and a run whose log rows come rarer prints each of them.
PLAIN_EVERY_S = 15.0


class MetricsLog:
    """Appends one JSON object per logged step / eval to metrics.jsonl and hands each row to every tracker;
    keeps the run's heartbeat.json fresh (written now, then with the rows, at most every BEAT_S seconds)."""

    def __init__(self, path: Path, trackers: list[Tracker], enabled: bool = True):
        self.path, self.trackers, self.enabled = path, trackers, enabled
        self.heartbeat = Heartbeat(path.parent)
        if enabled:  # rank 0: the segment has begun (its first row may be minutes away)
            self.heartbeat.start()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.metrics(row)
        self.heartbeat.beat(row["step"])


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


def progress_bar(
    enabled: bool, console: Console | None = None, per_step: str = ""
) -> Progress | PlainProgress:
    """step/total, loss, lr, real tokens/s (metrics.jsonl's tokens_per_s of the last log), ETA and, in plain
    lines, what a step holds (`per_step`, run_plan.per_step_short: packed rows are not samples): a Rich bar on
    a terminal, plain periodic lines when stdout is redirected; a disabled bar prints nothing."""
    console = console or get_console()
    if enabled and not (console.is_terminal or console.is_jupyter):
        return PlainProgress(out=console.file, per_step=per_step)
    # not in the Rich bar: on an 80-column terminal it pushes out the bar and step/total; the line printed
    # when training starts (`per step: ...`) says it once
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
        console=console,
        disable=not enabled,
    )


class PlainProgress:
    """The progress bar's stand-in for a log file:
    `step 120/240  loss 1.2340  lr 1.20e-03  420 tok/s  ~14 samples (8 rows), ~1,105 tok/step  eta 2m10s`.

    Takes the Rich bar's calls (add_task, update). A line is printed when a train log row arrives (an update
    with `loss`, then the step's `completed`) and `every_s` seconds have passed since the last line; the first
    and the last log row are always printed. Values are the log row's, as in metrics.jsonl.
    """

    def __init__(
        self,
        every_s: float = PLAIN_EVERY_S,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        per_step: str = "",
    ):
        self.every_s, self.out, self.clock = every_s, out, clock
        self.per_step = f"  {per_step}" if per_step else ""
        self.fields: dict = {}
        self.total = self.start = 0
        self.t0, self.last = 0.0, None
        self.logged = False  # a train log row came since the last `completed`

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, **fields) -> int:
        """Start counting at `completed` (a resumed segment): ETA is over this segment's pace."""
        self.total, self.start, self.t0 = total, completed, self.clock()
        self.fields.update(fields)
        return 0

    def update(self, task: int, completed: int | None = None, **fields) -> None:
        """Take new field values; after a log row's step completes, print its line when one is due."""
        self.logged = self.logged or "loss" in fields
        self.fields.update(fields)
        if completed is None or not self.logged:
            return
        self.logged = False
        now = self.clock()
        if self.last is None or completed >= self.total or now - self.last >= self.every_s:
            self.last = now
            print(self.line(completed, now), file=self.out or sys.stdout, flush=True)

    def line(self, done: int, now: float) -> str:
        """One progress line at step `done` (ETA from this segment's steps per second so far)."""
        f = self.fields
        ran = done - self.start
        eta = _duration((now - self.t0) / ran * (self.total - done)) if ran > 0 else "?"
        return (
            f"step {done}/{self.total}  loss {f['loss']:.4f}  lr {f['lr']:.2e}  "
            f"{f['tps']:,.0f} tok/s{self.per_step}  eta {eta}"
        )


def _duration(seconds: float) -> str:
    """2m10s, 1h05m, 45s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


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
