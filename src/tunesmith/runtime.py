"""Where code runs: device, dtype, peak matmul speed, seeding, distributed rank/world, rank-0 printing."""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Dist:
    """Distributed position of this process (world=1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> Dist:
    """Read torchrun's environment; no process group is created here."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def device(dist: Dist | None = None) -> torch.device:
    """CUDA (this process's local GPU) when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", (dist or dist_info()).local_rank)
    return torch.device("cpu")


def bf16_supported(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_bf16_supported()


def fast_bf16(dev: torch.device) -> bool:
    """Whether bf16 matmuls are native on `dev`: CUDA with bf16, or a CPU with AVX512-BF16 or AMX (else emulated, slow)."""
    if dev.type == "cuda":
        return bf16_supported(dev)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's capability probes
    return dev.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def weight_dtype(name: str, dev: torch.device) -> torch.dtype:
    """model.dtype -> torch dtype; auto = bf16 on CUDA with bf16 support, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(dev) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    """train.precision -> autocast dtype (None = no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(dev) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(dtype: torch.dtype | None, dev: torch.device):
    """An autocast context for `dtype`, or a no-op when dtype is None."""
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext()


def huge_pages_for_tensors() -> None:
    """Back CPU tensors of 2 MB and more with transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE).

    glibc gives every allocation over 32 MB (a chunk of logits, an embedding's gradient) fresh pages, and a
    training step makes hundreds of MB of them: faulting them in 4 KB at a time is most of their cost
    (64 MB: 30 ms to allocate and fill, 7 ms with huge pages, on this project's CPU). torch reads the
    variable at its first tensor of 2 MB or more, so call this before the model loads; a value the user
    set wins, and where THP is off ('never') nothing changes. Memory is returned to the OS as before.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def measure_peak_flops(device, bf16: bool = False, cache: Path | None = None) -> float:
    """Peak matmul FLOP/s of `device`: datasheet bf16 for known GPUs, else a short GEMM (kept in `cache`, a JSON file).

    On CPU the GEMM runs in fp32, or in bf16 when `bf16` (a run under bf16 autocast: its matmuls are bf16).
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, peak in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("4090", 165e12)):
            if key in name:
                return peak
    bf16 = bf16 or device.type == "cuda"
    key = f"{device.type}:{torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()}:{torch.get_num_threads()}"
    key += ":bf16" if bf16 and device.type != "cuda" else ""
    cached = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if key not in cached:
        cached[key] = _gemm_flops(device, torch.bfloat16 if bf16 else torch.float32)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(cached, indent=1))
    return cached[key]


def _gemm_flops(device, dtype) -> float:
    """Best of a few square GEMMs in `dtype`: 4096^2 on CUDA, 1024^2 on CPU."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if dist_info().is_main:
        print(*args, **kwargs)
