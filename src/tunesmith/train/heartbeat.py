"""<run>/heartbeat.json: a running segment's sign of life, the one rule `tunesmith runs` judges it by.

The trainer (train/log.py: MetricsLog, rank 0) rewrites it atomically when the run starts and with its log
rows, at most every BEAT_S seconds: {time, step, pid, host, gap_s}. train/record.py removes it when a segment
ends. A pid alone cannot tell a live run on another host, nor a pid the system gave to another process; a
heartbeat can: fresh = written within `stale_after(beat)` seconds, which grows with the observed gap between
log rows (a slow step or a rare log_every), never below STALE_S.

torch-free (no train/ import): `tunesmith runs` reads it without loading the trainer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

HEARTBEAT = "heartbeat.json"
BEAT_S = 15.0  # at most one write per this many seconds, however often rows are logged
STALE_S = 120.0  # a heartbeat older than this (or 4x the gap between log rows) is stale
GAP_FACTOR = 4


class Heartbeat:
    """Writes <run>/heartbeat.json on `start`, then on `beat(step)` once BEAT_S passed since the last one."""

    def __init__(self, run: Path, clock=time.time):
        self.path, self.clock = run / HEARTBEAT, clock
        self.written: float | None = None  # when the file was last written
        self.row: float | None = None  # when the last log row came (the gap between rows is recorded)
        self.gap: float | None = None

    def start(self) -> None:
        """The segment has begun (before its first step, which may be slow): write at once, no step yet."""
        self._write(None, self.clock())

    def beat(self, step: int) -> None:
        """A log row at `step` came: rewrite the file when it is due."""
        now = self.clock()
        if self.row is not None:
            self.gap = max(self.gap or 0.0, now - self.row)  # the longest gap seen: eval rows come rarer
        self.row = now
        if self.written is None or now - self.written >= BEAT_S:
            self._write(step, now)

    def _write(self, step: int | None, now: float) -> None:
        beat = {
            "time": now,
            "step": step,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "gap_s": self.gap,
        }
        tmp = self.path.with_name(HEARTBEAT + ".tmp")
        tmp.write_text(json.dumps(beat) + "\n")
        os.replace(tmp, self.path)  # a reader never sees half a heartbeat
        self.written = now


def stale_after(beat: dict) -> float:
    """Seconds after its `time` a heartbeat goes stale: STALE_S, or GAP_FACTOR x the gap between rows."""
    gap = beat.get("gap_s")
    return max(STALE_S, GAP_FACTOR * max(BEAT_S, gap if isinstance(gap, (int, float)) else 0.0))


def read_heartbeat(run: Path) -> dict | None:
    """<run>/heartbeat.json (None when absent or unreadable: then there is nothing to judge by)."""
    try:
        beat = json.loads((run / HEARTBEAT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(beat, dict) and isinstance(beat.get("time"), (int, float))
    return beat if ok else None


def remove(run: Path) -> None:
    """The segment has ended: no heartbeat is left to look alive."""
    (run / HEARTBEAT).unlink(missing_ok=True)
