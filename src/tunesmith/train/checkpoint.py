"""Checkpoints: atomic (tmp dir + fsync + rename), keep_last, and everything exact resume needs.

A checkpoint dir `checkpoints/step-N/` holds trainable weights (safetensors), optimizer and scheduler
state, RNG states (python, numpy, torch, cuda) and the data cursor. Frozen weights (LoRA's base) are not
stored: they are reloaded from the base model, bit-identical.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import UserError


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


def save(run_dir: Path, step: int, model, optimizer, scheduler, cursor: dict, keep_last: int) -> Path:
    """Write checkpoints/step-{step} atomically, then prune to keep_last; a failure never touches older ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / "state.pt")
    (tmp / "cursor.json").write_text(json.dumps({"step": step, **cursor}))
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
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "cursor.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """train.resume -> the checkpoint dir to load, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "cursor.json").is_file():
        raise UserError(f"train.resume: '{resume}' is not a checkpoint dir (expected {run_dir}/checkpoints/step-N)")
    return path


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; return the cursor."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise UserError(f"{path}: checkpoint does not match the model ({len(missing)} unknown tensors, e.g. '{missing[0]}'); was lora/model changed?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    # weights_only=True: only tensors and plain containers are read back, nothing arbitrary is unpickled.
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return json.loads((path / "cursor.json").read_text())
