"""Checkpoints: atomic (tmp dir + fsync + rename), checksummed, keep_last, and everything exact resume needs.

A checkpoint dir `checkpoints/step-N/` holds trainable weights (safetensors), optimizer and scheduler
state, RNG states (python, numpy, torch, cuda), the data cursor, the run's fingerprint (what it was trained
under, see record.py) and, written last, `checksums.json` (sha256 and size of every other file). Frozen
weights (LoRA's base) are not stored: they are reloaded from the base model, bit-identical.

The rename makes a checkpoint appear whole or not at all; the checksums catch what happens to it later (a
copy cut short, a full disk during rsync, bit rot). `train.resume=auto` takes the newest intact checkpoint
and names every corrupt one it skips; an explicit path that is corrupt is an error, never a fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunesmith.config import UserError
from tunesmith.runtime import print0

CHECKSUMS = "checksums.json"
FINGERPRINT = "fingerprint.json"
REQUIRED = ("trainable.safetensors", "state.pt", "cursor.json")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (named_parameters dedups tied weights, which safetensors rejects)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    cursor: dict,
    keep_last: int,
    fingerprint: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write checkpoints/step-{step} atomically, then prune to keep_last; a failure never touches older ones.

    `cursor`: the data stream's state plus the loop's counters (e.g. tokens seen, the best-checkpoint
    selection); `scaler`: fp16's loss scale, stored when enabled so a resumed run scales (and skips) exactly
    as an uninterrupted one.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp / "state.pt")
    (tmp / "cursor.json").write_text(json.dumps({"step": step, **cursor}))
    if fingerprint is not None:
        (tmp / FINGERPRINT).write_text(json.dumps(fingerprint))
    # Last, so it covers every file above. Hashing re-reads them from the page cache (measured 0.6 GiB/s on a
    # 2-core dev box: ~20 s for a 1B full fine-tune's 12 GB of weights + Adam state), rather than holding a
    # second in-memory copy of a large state to hash while writing.
    files = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps({"format": 1, "files": files}))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)  # the rename is durable once the parent dir is synced
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of interrupted saves are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / "cursor.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _loads(path: Path) -> str | None:
    """For checkpoints written before checksums existed: None if every file loads, else why not."""
    try:
        load_file(path / "trainable.safetensors")
        torch.load(path / "state.pt", weights_only=True)
        json.loads((path / "cursor.json").read_text())
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        return f"does not load: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return None


def verify(path: Path) -> str | None:
    """None if the checkpoint at `path` is intact, else what is wrong (older checkpoints: that it loads)."""
    if not (path / CHECKSUMS).is_file():
        return _loads(path)
    try:
        listed = json.loads((path / CHECKSUMS).read_text())["files"]
        expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{CHECKSUMS} is unreadable"
    for name in REQUIRED:
        if name not in expected:
            return f"{name} is not listed in {CHECKSUMS}"
    for name, (
        size,
        _,
    ) in expected.items():  # sizes first: a cut-short copy is found without hashing anything
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written (truncated?)"
    for name, (_, digest) in expected.items():
        if _sha256(path / name) != digest:
            return f"{name} does not match its sha256 (corrupt)"
    return None


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """train.resume -> the verified checkpoint dir to load, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        return _newest_intact(run_dir)
    path = Path(resume)
    if not (path / "cursor.json").is_file():
        raise UserError(
            f"train.resume: '{resume}' is not a checkpoint dir (expected {run_dir}/checkpoints/step-N)"
        )
    problem = verify(path)
    if problem is not None:
        raise UserError(
            f"{path}: corrupt checkpoint ({problem}) (give another checkpoint, or train.resume=auto for "
            f"the newest intact one in {run_dir})"
        )
    return path


def _newest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; each corrupt one skipped is named on stderr; none intact ->
    UserError."""
    found = checkpoints(run_dir)
    bad = []
    for ckpt in reversed(found):
        problem = verify(ckpt)
        if problem is None:
            if not (ckpt / CHECKSUMS).is_file():
                print0(
                    f"note: {ckpt} has no checksums (older tunesmith); it loads, so it is used",
                    file=sys.stderr,
                )
            return ckpt
        bad.append(f"{ckpt.name}: {problem}")
        print0(
            f"warning: checkpoint {ckpt} is corrupt ({problem}); skipping it, it is left in place",
            file=sys.stderr,
        )
    if bad:
        raise UserError(
            f"{run_dir}: no intact checkpoint to resume from ({'; '.join(bad)}) (train.resume=never starts "
            "over; the old files are moved aside, not deleted)"
        )
    return None


def fingerprint_of(path: Path) -> dict | None:
    """What the checkpoint was trained under (None for checkpoints of older tunesmith)."""
    f = path / FINGERPRINT
    return json.loads(f.read_text()) if f.is_file() else None


def load(path: Path, model, optimizer, scheduler, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Restore weights, optimizer, scheduler, RNG and (fp16) the loss scaler from `path`; the cursor."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise UserError(
            f"{path}: checkpoint does not match the model ({len(missing)} unknown tensors, e.g. "
            f"'{missing[0]}'); was lora/model changed?"
        )
    absent = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if absent:  # else those parameters would silently keep their fresh initial values
        raise UserError(
            f"{path}: checkpoint does not match the model ({len(absent)} trainable tensors missing, e.g. "
            f"'{absent[0]}'); was lora/model changed?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    # weights_only=True: only tensors and plain containers are read back, nothing arbitrary is unpickled.
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    if scaler is not None and scaler.is_enabled() and "scaler" in state:  # older checkpoints: a fresh scale
        scaler.load_state_dict(state["scaler"])
    return json.loads((path / "cursor.json").read_text())


# ---- best/: the best eval point, in final/'s format (train.select)

BEST = "best"
BEST_JSON = "best.json"


def save_best(run_dir: Path, model, tokenizer, spec: dict, merge: bool, info: dict) -> Path:
    """Write <run>/best exactly as final/ is written (save_final) plus best.json; it replaces the old best/
    whole. RNG states are kept as they were, so keeping a best never changes the training that follows."""
    from tunesmith.model.export import save_final

    rng = _rng_state()  # a merge loads the base model again; whatever that draws must not reach training
    try:
        staging = save_final(model, tokenizer, run_dir / f".{BEST}-staging", spec, merge=merge)
    finally:
        _set_rng_state(rng)
    return _publish_best(staging, run_dir, info)


def link_best(run_dir: Path, final: Path, info: dict) -> Path:
    """<run>/best as hard links to final/'s files (the last eval is the best: same weights, no copy)."""
    staging = run_dir / f".{BEST}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(final, staging, copy_function=_link_or_copy)
    return _publish_best(staging, run_dir, info)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # final/ files are never rewritten in place (a new final/ is a new dir)
    except OSError:
        shutil.copy2(src, dst)


def _publish_best(staging: Path, run_dir: Path, info: dict) -> Path:
    """best.json into the staging dir, then rename it to best/: a reader sees the old best/ or the new one
    whole (or, for the instant between the two renames, none), never half of one."""
    (staging / BEST_JSON).write_text(json.dumps(info, indent=2))
    best = run_dir / BEST
    old = run_dir / f".{BEST}.old-{os.getpid()}"
    if best.exists():
        os.rename(best, old)
    os.rename(staging, best)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return best


def read_best(run_dir: Path) -> dict | None:
    """<run>/best/best.json (None when there is no best/)."""
    path = run_dir / BEST / BEST_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def rewind_best(run_dir: Path, step: int) -> Path | None:
    """Resuming at `step`: a best/ kept after it belongs to steps about to be redone; it moves to
    best.rewound/ (replacing an older one) so best/ never holds weights the resumed run has not reached.
    Returns where it went."""
    info = read_best(run_dir)
    if info is None or int(info.get("step", 0)) <= step:
        return None
    dest = run_dir / f"{BEST}.rewound"
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(run_dir / BEST, dest)
    return dest
