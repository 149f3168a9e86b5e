"""The run record: manifest.json (what exactly was trained, on what, with which versions)."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("tunesmith", "torch", "transformers", "peft", "tokenizers", "datasets", "safetensors")


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
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None


def hardware(device: torch.device, world: int) -> dict:
    """What ran the job."""
    info = {"device": device.type, "world_size": world, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_manifest(path: Path, **fields) -> None:
    """manifest.json with the given fields plus package versions and the git revision."""
    record = {**fields, "versions": _versions(), "git_rev": _git_rev()}
    path.write_text(json.dumps(record, indent=2, default=str))
