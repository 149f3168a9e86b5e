"""The run record and the guards that keep one run dir one run.

manifest.json says what exactly was trained, on what, with which versions. A run can be trained in several
segments (stopped, resumed, ...): `segments` keeps every one of them (started/ended at step, what changed
and whether that was allowed, times, versions), appended, never rewritten; the top-level fields describe the
latest segment.

The fingerprint of a segment is what must not change while a run continues: the data, template and
tokenizer hashes, the world size, and every config key of the model/data/train/lora sections except those in
RESUME_FREE. A resume whose fingerprint differs is refused unless `train.resume_changed=allow`; a fresh run
into a dir that holds a finished run of another fingerprint is refused unless `train.overwrite=true`; the
files of an earlier run are moved to `<out_dir>/previous-<time>/`, never deleted.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
import yaml

from tunesmith.config import UserError
from tunesmith.plan.history import cpu_name
from tunesmith.train import heartbeat

PACKAGES = ("tunesmith", "torch", "transformers", "peft", "tokenizers", "datasets", "safetensors")
MANIFEST = "manifest.json"

# The one list of config keys that may differ between the segments of a run. They change what is logged or
# kept, where files are, or the speed/memory of a step, never the optimisation itself: same maths.
# (attn_implementation, compile, gradient_checkpointing and fsdp change float rounding at most.)
RESUME_FREE = frozenset(
    {
        "out_dir",
        "train.resume",
        "train.resume_changed",
        "train.overwrite",
        "train.log_every",
        "train.save_every",
        "train.keep_last",
        "train.eval_every",
        "train.eval_limit",
        "train.time_budget",  # how long this segment may take; a sized run's steps are in budget.json
        "train.report_to",
        "train.report_model",
        "train.select",
        "train.select_mode",
        "train.early_stop_patience",
        "train.early_stop_min_delta",
        "train.compile",
        "train.gradient_checkpointing",
        "train.fsdp",
        "model.attn_implementation",
        "model.cache_dir",
        "model.trust_remote_code",
        "data.path",
        "data.test_path",  # what they hold is compared (data_hash); the files may move
    }
)
# Sections that decide the training; eval, generate, serve, synth and plan never touch it.
COMPARED_SECTIONS = ("model", "data", "train", "lora")
HASHES = ("data_hash", "template_hash", "tokenizer_hash")

# What a run leaves in its dir. The data cache (data/) and data_rejects.jsonl are not in it: they describe the
# data, are keyed by it, and the current run has just (re)written them.
RUN_FILES = (
    "checkpoints",
    "final",
    "best",
    "best.rewound",
    "export",
    "export-best",
    "export-final",
    "eval",
    "tensorboard",
    "mlflow",
    "wandb",
    "tracking.json",
    "metrics.jsonl",
    "metrics.rewound.jsonl",
    heartbeat.HEARTBEAT,
    MANIFEST,
    "config.yaml",
    "plan.json",
    "loss.png",
    "train_result.json",
    "budget.json",
)
_TRAINED = ("checkpoints", "final", "metrics.jsonl", MANIFEST)  # any of these: an earlier run trained here


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def hardware(device: torch.device, world: int) -> dict:
    """What ran the job."""
    info = {
        "device": device.type,
        "world_size": world,
        "cpu": cpu_name(),  # the model name (platform.processor() is empty on Linux)
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- fingerprints


def fingerprint(cfg: dict, world: int | None, hashes: dict[str, str]) -> dict:
    """Hashes, world size and the compared config keys (dotted; `cfg` is a config as a plain dict)."""
    flat: dict = {k: v for k, v in hashes.items() if v is not None}
    if world is not None:
        flat["world_size"] = world  # the global batch is batch_size x grad_accum x world
    for section in COMPARED_SECTIONS:
        value = cfg.get(section)
        if section == "lora":  # an optional section: whether it is on is a key of its own
            flat["lora"] = value is not None
        for key, v in (value if isinstance(value, dict) else {}).items():
            if f"{section}.{key}" not in RESUME_FREE:
                flat[f"{section}.{key}"] = v
    return json.loads(json.dumps(flat))  # tuples -> lists, as they come back from JSON


def changes(old: dict, new: dict) -> list[dict]:
    """Keys whose values differ, in `new`'s order. Keys missing on either side are not compared: a field added
    by a newer tunesmith (or a run recorded by an older one) is not a change."""
    return [{"key": k, "old": old[k], "new": v} for k, v in new.items() if k in old and old[k] != v]


def _show(key: str, value) -> str:
    if key.endswith("_hash") and isinstance(value, str):
        return value[:8] + "..."
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else "..." + text[-60:]  # paths differ at the end


def describe_changes(changed: list[dict]) -> str:
    """'data_hash 3f2a... -> 9c01..., train.lr 0.0001 -> 0.0003'."""
    return ", ".join(
        f"{c['key']} {_show(c['key'], c['old'])} -> {_show(c['key'], c['new'])}" for c in changed
    )


def read_manifest(run: Path) -> dict | None:
    """manifest.json of `run` (None if absent)."""
    path = run / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(
            f"{path}: not valid JSON ({e}) (move it away to treat {run} as a run with no record)"
        ) from None
    if not isinstance(record, dict):
        raise UserError(
            f"{path}: not a tunesmith manifest (move it away to treat {run} as a run with no record)"
        )
    return record


def recorded_fingerprint(run: Path, checkpoint_fp: dict | None = None) -> dict | None:
    """What `run` was trained under: the checkpoint's own record, else the manifest's; for runs of an older
    tunesmith, its config.yaml plus the manifest's hashes. None when nothing was recorded."""
    if checkpoint_fp is not None:
        return checkpoint_fp
    manifest = read_manifest(run)
    if manifest is not None and isinstance(manifest.get("fingerprint"), dict):
        return manifest["fingerprint"]
    cfg_path = run / "config.yaml"
    if manifest is None and not cfg_path.is_file():
        return None
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    except (yaml.YAMLError, ValueError):  # unreadable: compare the hashes alone
        cfg = {}
    hashes = {k: manifest.get(k) for k in HASHES} if manifest else {}
    return fingerprint(cfg if isinstance(cfg, dict) else {}, None, hashes)


# ---- the guards


def check_resume(run: Path, new: dict, old: dict | None, allow: bool) -> list[dict]:
    """What changed since the checkpoint was written; UserError unless nothing did or the user allowed it."""
    if old is None:
        return []  # a checkpoint with no record next to it (copied in by hand): nothing to compare with
    changed = changes(old, new)
    if changed and not allow:
        raise UserError(
            f"{run}: cannot resume: {describe_changes(changed)} (set train.resume_changed=allow to "
            "continue anyway; the manifest records it)"
        )
    return changed


def check_fresh(run: Path, new: dict, overwrite: bool) -> None:
    """A fresh run into a dir with a finished run (final/) of another config: UserError unless overwrite."""
    if overwrite or not (run / "final").exists():
        return
    old = recorded_fingerprint(run)
    way_out = (
        f"set train.overwrite=true to move it to {run}/previous-<time>/ and start over, "
        "or choose another out_dir"
    )
    if old is None:
        raise UserError(f"{run}: holds a finished model (final/) with no record of its config ({way_out})")
    changed = changes(old, new)
    if changed:
        raise UserError(
            f"{run}: holds a finished run of another config: {describe_changes(changed)} ({way_out})"
        )


def move_aside(run: Path) -> Path | None:
    """Move an earlier run's files into <run>/previous-<time>/ (None if none trained here): none deleted."""
    if not any((run / name).exists() for name in _TRAINED):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = run / f"previous-{stamp}", 1
    while dest.exists():
        n += 1
        dest = run / f"previous-{stamp}-{n}"
    dest.mkdir()
    for name in RUN_FILES:
        if (run / name).exists():
            os.rename(run / name, dest / name)
    return dest


# ---- the manifest and its segments


def _write(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)  # a crash mid-write never leaves half a manifest (and with it, the history)


def _legacy_segment(old: dict) -> dict:
    """A manifest written before segments were recorded, as the first segment."""
    return {
        "started_at_step": 0,
        "ended_at_step": None,
        "status": "unknown (recorded before segments)",
        "versions": old.get("versions"),
        "git_rev": old.get("git_rev"),
        "hardware": old.get("hardware"),
    }


def begin_segment(
    run: Path, fp: dict, start: int, resumed_from: Path | None, changed: list[dict], **fields
) -> None:
    """Write manifest.json for a new segment: `fields` and the fingerprint on top, the segment appended."""
    old = (
        read_manifest(run) if resumed_from is not None else None
    )  # a fresh run's predecessor was moved aside
    segments = (old.get("segments") or [_legacy_segment(old)]) if old else []
    versions, rev = _versions(), _git_rev()
    segments.append(
        {
            "started_at_step": start,
            "ended_at_step": None,
            "status": "running",
            "resumed_from": str(resumed_from) if resumed_from else None,
            "changed": changed,
            "allowed": bool(changed),  # true: train.resume_changed=allow let these through
            "started": _now(),
            "ended": None,
            "versions": versions,
            "git_rev": rev,
            "hardware": fields.get("hardware"),
            # who writes this segment: `tunesmith runs` tells a live run from one whose process died
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
    )
    _write(
        run / MANIFEST,
        {**fields, "fingerprint": fp, "versions": versions, "git_rev": rev, "segments": segments},
    )


def end_segment(
    run: Path, step: int, status: str, error: str | None = None, extra: dict | None = None
) -> None:
    """Close the latest segment: the step it reached, how it ended (finished, stopped, diverged, failed)."""
    record = read_manifest(run)
    if not record or not record.get("segments"):
        return
    record["segments"][-1].update(ended_at_step=step, status=status, ended=_now())
    if error is not None:
        record["segments"][-1]["error"] = error
    record["segments"][-1].update(extra or {})  # e.g. early_stop and best (train/loop.py)
    _write(run / MANIFEST, record)
    heartbeat.remove(run)  # the segment says how it ended: nothing left to look alive


@contextmanager
def failed_on_error(run: Path, enabled: bool, step: Callable[[], int]) -> Iterator[None]:
    """An exception out of the block closes a still-running segment as failed, with the step reached and the
    error's one line, then propagates (a segment the block closed itself, e.g. diverged, is left as it is)."""
    try:
        yield
    except Exception as e:
        record = read_manifest(run) if enabled else None
        if record and record.get("segments") and record["segments"][-1].get("status") == "running":
            end_segment(run, step(), "failed", error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
        raise
