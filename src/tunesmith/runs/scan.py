"""Run dirs on disk -> one row each: what was trained, how far it got, how it ended, how good it came out.

The status comes from manifest.json's latest segment (train/record.py writes and closes it):
  finished     the segment says so
  interrupted  stopped by a signal with a checkpoint saved (train.resume=auto continues it); with no
               manifest: checkpoints but no final/
  failed       diverged or raised (the segment says so, with the error), or still marked running while the
               process that wrote it is gone (killed, out of memory, the machine went down)
  running      marked running, its heartbeat (train/heartbeat.py) is fresh and, on this host, its pid is alive
               (on another host the heartbeat is all there is); a segment written before heartbeats existed,
               or one that has not beaten yet: its pid is alive on this host (another host: not checked)
  unknown      nothing on disk tells (no manifest and no checkpoint nor final/; a segment without a pid), or
               the heartbeat is stale while the process may still be there (another host; a pid alive here)
  unreadable   manifest.json or config.yaml is corrupt, or the dir cannot be read: the reason says which
Every row has every key of ROW_KEYS (None where the run does not tell), so `--json` is stable for scripts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import UserError
from tunesmith.train.heartbeat import read_heartbeat, stale_after

MARKERS = ("manifest.json", "config.yaml")  # a dir holding either is a run dir
# What a run dir holds besides earlier runs moved aside (previous-*/, listed as runs of their own).
INSIDE_A_RUN = frozenset({"checkpoints", "final", "best", "export", "eval", "tensorboard", "data"})
HEADLINE = {"token_f1": "token_f1", "rouge_l": "rouge_l", "probe_recall": "probe_numeric_recall"}
ROW_KEYS = (
    "name",
    "path",
    "status",
    "reason",
    "model",
    "data_hash",
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "lora",
    "lora_r",
    "precision",
    "steps",
    "total_steps",
    "tokens",
    "tokens_per_s",
    "best_eval_loss",
    "best_eval_step",
    "final_eval_loss",
    *(f"{side}_{k}" for k in HEADLINE for side in ("tuned", "base")),
    "segments",
    "started",
    "ended",
)


class Corrupt(Exception):
    """A run file that exists but cannot be read as what it should be (the message names it)."""


def find_runs(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every run dir under `root` (itself included, nested dirs searched), and the dirs it cannot read."""
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (give the dir that holds your runs, e.g. runs/)")
    found: list[Path] = []
    errors: list[tuple[Path, str]] = []
    walk = os.walk(root, onerror=lambda e: errors.append((Path(e.filename), e.strerror or str(e))))
    for dirpath, dirnames, filenames in walk:
        is_run = any(m in filenames for m in MARKERS)
        if is_run:
            found.append(Path(dirpath))
        # a run's own subdirs (checkpoints, final/...) hold no runs; hidden dirs are tools' (.git, .tmp-step)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (is_run and d in INSIDE_A_RUN)
        )
    return sorted(found), errors


def load_json(path: Path) -> Any:
    """A JSON file (None if absent); Corrupt when it is not valid JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise Corrupt(f"{path.name}: not valid JSON ({e})") from None


def load_config_dict(run: Path) -> dict | None:
    """config.yaml as a plain dict (None if absent); Corrupt when it is not a YAML mapping."""
    path = run / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, OSError) as e:
        raise Corrupt(f"config.yaml: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise Corrupt("config.yaml: not a mapping of config sections")
    return cfg


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """metrics.jsonl rows with a step, and how many lines are unreadable (a kill can cut the last short)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints (as train/checkpoint.py: a step-N dir with cursor.json)."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / "cursor.json").is_file()]
    return sorted(int(p.name.split("-")[1]) for p in found)


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # "pid (comm) state ..."
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) succeeding is all there is


def _dead(pid: int) -> tuple[str, str]:
    """Marked running on this host, but its process is gone."""
    return "failed", (
        f"process {pid} ended without closing its record (killed, out of memory, or the machine went down); "
        "train.resume=auto continues from the newest checkpoint"
    )


def _live(seg: dict, run: Path, now: float) -> tuple[str, str]:
    """A segment still marked running: judged by its heartbeat when it has one, else by its pid."""
    pid, host = seg.get("pid"), seg.get("host")
    if not isinstance(pid, int):
        return (
            "unknown",
            "marked running, but no pid recorded (an older tunesmith): alive or dead cannot be told",
        )
    here = host == socket.gethostname()
    beat = read_heartbeat(run)
    if beat is None or (beat.get("pid"), beat.get("host")) != (pid, host):
        # no heartbeat of this segment: written before heartbeats existed, or not yet beaten
        if not here:
            return "running", f"marked running by pid {pid} on {host} (not checked from here)"
        return ("running", f"pid {pid}") if _alive(pid) else _dead(pid)
    if here and not _alive(pid):
        return _dead(pid)
    age, step = now - beat["time"], beat.get("step")
    at = f"step {step}" if isinstance(step, int) else "before its first step"
    where = "" if here else f" on {host}"
    if age <= stale_after(beat):
        return "running", f"pid {pid}{where}, heartbeat {max(age, 0):.0f}s ago ({at})"
    since = time.strftime("%H:%M UTC", time.gmtime(beat["time"]))
    maybe = (
        "a slow step or eval, a hung process, or the pid now belongs to another process"
        if here
        else "stopped without closing its record, or hung (cannot be checked from here)"
    )
    return "unknown", (
        f"no heartbeat since {since} ({at}) from pid {pid}{where}: {maybe}; "
        "if it is gone, train.resume=auto continues from the newest checkpoint"
    )


def _from_files(run: Path, why: str) -> tuple[str, str]:
    """No segment to go by: final/ means finished, checkpoints alone interrupted, neither unknown."""
    steps = checkpoint_steps(run)
    if (run / "final").is_dir():
        return "finished", f"{why}; final/ exists"
    if steps:
        return "interrupted", f"{why}; checkpoints up to step {steps[-1]}, no final/"
    return "unknown", f"{why}; no checkpoint and no final/"


def status_of(run: Path, manifest: dict | None, now: float | None = None) -> tuple[str, str | None]:
    """(status, reason): see the module docstring; `now` (seconds since the epoch) ages the heartbeat."""
    segments = manifest.get("segments") if manifest else None
    if not segments or not isinstance(segments[-1], dict):
        return _from_files(run, "no manifest.json" if manifest is None else "manifest.json has no segments")
    seg = segments[-1]
    state, at = seg.get("status"), seg.get("ended_at_step")
    if state == "finished":
        return ("finished", None) if (run / "final").is_dir() else ("finished", "final/ is missing")
    if state == "stopped":
        return "interrupted", f"stopped by a signal at step {at} (continue with train.resume=auto)"
    if state in ("diverged", "failed"):
        return "failed", f"{state} at step {at}: {seg.get('error') or 'no error recorded'}"
    if state == "running":
        return _live(seg, run, time.time() if now is None else now)
    return _from_files(run, f"latest segment's status is {state!r}")


def _get(cfg: dict | None, fp: dict, key: str) -> Any:
    """A dotted key from config.yaml, else from the manifest's fingerprint (it has the same dotted keys)."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if node is not None else fp.get(key)


def _throughput(train_rows: list[dict]) -> float | None:
    """Real tokens per second of training steps over the logged windows: their tokens / their seconds, each
    window's seconds being its tokens over its tokens_per_s (train/loop.py logs both)."""
    tokens = seconds = 0.0
    before = 0
    for row in train_rows:
        tps, total = row.get("tokens_per_s"), row.get("tokens")
        if isinstance(tps, (int, float)) and tps > 0 and isinstance(total, (int, float)):
            tokens += total - before
            seconds += (total - before) / tps
        before = total if isinstance(total, (int, float)) else before
    return tokens / seconds if seconds > 0 else None


def _training(row: dict, metrics: list[dict], manifest: dict | None, run: Path) -> None:
    """Steps, tokens, tokens/s and the eval losses from metrics.jsonl (and the manifest's last step)."""
    train_rows = [m for m in metrics if m.get("split") == "train"]
    evals = [m for m in metrics if m.get("split") == "eval" and isinstance(m.get("loss"), (int, float))]
    segments = (manifest or {}).get("segments") or [{}]
    ended = segments[-1].get("ended_at_step") if isinstance(segments[-1], dict) else None
    ckpts = checkpoint_steps(run)
    row["steps"] = ended if isinstance(ended, int) else max((m["step"] for m in metrics), default=None)
    if row["steps"] is None and ckpts:
        row["steps"] = ckpts[-1]
    row["tokens"] = train_rows[-1].get("tokens") if train_rows else None
    row["tokens_per_s"] = _throughput(train_rows)
    if evals:
        best = min(evals, key=lambda m: m["loss"])
        row.update(
            best_eval_loss=best["loss"], best_eval_step=best["step"], final_eval_loss=evals[-1]["loss"]
        )


def _config(row: dict, cfg: dict | None, manifest: dict | None) -> None:
    """Model, data hash and the key hyperparameters (config.yaml first, the manifest's fingerprint second)."""
    manifest = manifest or {}
    fp = manifest.get("fingerprint") if isinstance(manifest.get("fingerprint"), dict) else {}
    row["model"] = manifest.get("model") or _get(cfg, fp, "model.name")
    row["data_hash"] = manifest.get("data_hash") or fp.get("data_hash")
    for key in ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "precision"):
        row[key] = _get(cfg, fp, f"train.{key}")
    lora = cfg.get("lora") if cfg is not None else None
    row["lora"] = lora is not None if cfg is not None else fp.get("lora", manifest.get("lora"))
    row["lora_r"] = lora.get("r") if isinstance(lora, dict) else (fp.get("lora.r") if row["lora"] else None)


def _headline(row: dict, evals: Any) -> None:
    """Token F1, ROUGE-L and probe recall of the tuned and base model from eval/metrics.json."""
    if not isinstance(evals, dict):
        return
    for side in ("tuned", "base"):
        values = evals.get(side) if isinstance(evals.get(side), dict) else {}
        for key, name in HEADLINE.items():
            v = values.get(name)
            row[f"{side}_{key}"] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def read_run(run: Path, root: Path) -> dict:
    """One row (every key of ROW_KEYS) for the run dir `run`; a corrupt manifest or config: unreadable."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    name = run.relative_to(root).as_posix() if run != root else run.resolve().name
    row.update(name=name, path=str(run))
    notes = []
    try:
        manifest = load_json(run / "manifest.json")
        if manifest is not None and not isinstance(manifest, dict):
            raise Corrupt("manifest.json: not a tunesmith manifest (a JSON object)")
        cfg = load_config_dict(run)
    except Corrupt as e:
        row.update(status="unreadable", reason=str(e))
        return row
    metrics, bad = read_metrics(run / "metrics.jsonl")
    if bad:
        notes.append(f"metrics.jsonl: {bad} unreadable line(s) left out")
    try:
        evals = load_json(run / "eval" / "metrics.json")
    except Corrupt as e:
        evals = None
        notes.append(f"eval/{e}")
    try:
        plan = load_json(run / "plan.json")
    except Corrupt as e:
        plan = None
        notes.append(str(e))
    status, reason = status_of(run, manifest)
    row.update(status=status, reason="; ".join(([reason] if reason else []) + notes) or None)
    _config(row, cfg, manifest)
    _training(row, metrics, manifest, run)
    _headline(row, evals)
    planned = plan.get("run") if isinstance(plan, dict) else None
    row["total_steps"] = planned.get("steps") if isinstance(planned, dict) else None
    segments = (manifest or {}).get("segments") or []
    if segments and isinstance(segments[0], dict) and isinstance(segments[-1], dict):
        row.update(
            segments=len(segments), started=segments[0].get("started"), ended=segments[-1].get("ended")
        )
    return row


def scan(root: Path) -> list[dict]:
    """A row per run dir under `root`, and an unreadable row per dir that could not be searched."""
    runs, errors = find_runs(root)
    rows = [read_run(run, root) for run in runs]
    for path, why in errors:
        row = dict.fromkeys(ROW_KEYS)
        row.update(
            name=str(path), path=str(path), status="unreadable", reason=f"cannot list this dir ({why})"
        )
        rows.append(row)
    return rows
