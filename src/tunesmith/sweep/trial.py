"""One trial = one ordinary run dir, trained by `python -m tunesmith train` in a child process.

The sweep follows the child's metrics.jsonl for eval rows (reported to Optuna as intermediate values)
and, when the pruner says so, sends SIGTERM: the trainer checkpoints at the end of its step and exits
128+15 (train/loop.py). A child dies with its sweep (PR_SET_PDEATHSIG on Linux), so a killed sweep leaves
no trainer writing into a run dir that the resumed sweep is about to resume.

The metric a trial returns: `eval_<field>` metrics (eval_loss, eval_perplexity / eval_ppl) are the last
eval row of its metrics.jsonl; any other name is read from <run>/eval/metrics.json (written by `tunesmith
compare`, which the sweep runs after training), as `tuned.<name>` unless it names the system
(`base.rougeL`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .study import HEARTBEAT_S

POLL_S = 0.5  # how often metrics.jsonl is read while a trial trains
_EVAL_FIELDS = {"eval_ppl": "perplexity"}


@dataclass
class Outcome:
    """How a trial's child ended: complete (value), pruned, failed, interrupted or user_error (note)."""

    status: str
    value: float | None = None
    note: str = ""
    rc: int = 0


def eval_field(metric: str) -> str | None:
    """The metrics.jsonl eval-row field a metric reads (eval_loss -> loss), None for a compare metric."""
    if not metric.startswith("eval_"):
        return None
    return _EVAL_FIELDS.get(metric, metric.removeprefix("eval_"))


def _die_with_parent(parent: int):
    """A preexec_fn: the kernel SIGKILLs the child when the sweep process dies (Linux; a no-op elsewhere)."""

    def setup() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the sweep died before prctl took effect
                os._exit(1)

    return setup


def launch(argv: list[str], log: Path) -> subprocess.Popen:
    """Start `python -m tunesmith <argv>`, stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tunesmith", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(os.getpid()),
        )


def eval_rows(run_dir: Path) -> list[dict]:
    """The eval rows of <run>/metrics.jsonl so far (a line still being written is left for the next read)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            row = json.loads(line)
            if row.get("split") == "eval":
                rows.append(row)
    return rows


def final_value(run_dir: Path, metric: str) -> tuple[float | None, str]:
    """(the trial's metric, '') or (None, why it is missing)."""
    field = eval_field(metric)
    if field is not None:
        values = [r[field] for r in eval_rows(run_dir) if isinstance(r.get(field), (int, float))]
        if values:
            return float(values[-1]), ""
        return None, f"no '{field}' in the eval rows of {run_dir / 'metrics.jsonl'} (a test split is needed)"
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return None, f"{path} not found"
    system, _, name = metric.rpartition(".")
    value = json.loads(path.read_text(encoding="utf-8")).get(system or "tuned", {}).get(name)
    if not isinstance(value, (int, float)):
        return None, f"{path}: no numeric '{name}' under '{system or 'tuned'}'"
    return float(value), ""


def _last_line(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def _report(trial, run_dir: Path, field: str | None, reported: set[int], prune: bool) -> bool:
    """Report new eval rows to the trial; True when the pruner wants it stopped."""
    if field is None:
        return False
    for row in eval_rows(run_dir):
        if row["step"] not in reported and isinstance(row.get(field), (int, float)):
            trial.report(float(row[field]), row["step"])
            reported.add(row["step"])
            if prune and trial.should_prune():
                return True
    return False


def follow(trial, proc: subprocess.Popen, run_dir: Path, field: str | None, prune: bool) -> bool:
    """Wait for the trainer, reporting eval rows, beating the heartbeat; SIGTERM it when pruned (-> True)."""
    reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)  # a resumed trial's
    pruned, beat = False, time.time()
    try:
        while proc.poll() is None:
            time.sleep(POLL_S)
            if not pruned and _report(trial, run_dir, field, reported, prune):
                proc.send_signal(signal.SIGTERM)  # the trainer saves and exits 128+15
                pruned = True
            if time.time() - beat > HEARTBEAT_S:
                beat = time.time()
                trial.set_user_attr("heartbeat", beat)
    except KeyboardInterrupt:  # Ctrl-C: the trainer (same process group) got SIGINT too; let it save
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    if not pruned:  # the last eval rows, written just before the trainer exited
        _report(trial, run_dir, field, reported, prune=False)
    return pruned


def outcome(rc: int, pruned: bool, log: Path) -> Outcome:
    """The trainer's exit code -> how the trial ended (the metric is read separately for complete ones)."""
    stopped = rc in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT)
    if pruned and (rc == 0 or stopped):
        return Outcome("pruned")
    if rc == 0:
        return Outcome("complete")
    if stopped:
        code = rc if rc > 0 else 128 - rc
        return Outcome(
            "interrupted", note=f"stopped by a signal (exit {rc}); resumes from its checkpoint", rc=code
        )
    if rc == 2:
        return Outcome("user_error", note=_last_line(log))
    why = f"killed by signal {-rc}" if rc < 0 else (_last_line(log) or f"exit code {rc}")
    return Outcome("failed", note=why)
