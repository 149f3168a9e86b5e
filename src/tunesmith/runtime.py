"""Where code runs: device, dtype, peak matmul speed, seeding, distributed rank/world, rank-0 printing, the
process's peak resident memory (CPU)."""

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
    return Dist(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def device(dist: Dist | None = None) -> torch.device:
    """CUDA (this process's local GPU) when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", (dist or dist_info()).local_rank)
    return torch.device("cpu")


def bf16_supported(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_bf16_supported()


def fast_bf16(dev: torch.device) -> bool:
    """Whether bf16 matmuls are native on `dev` (CUDA with bf16, a CPU with AVX512-BF16 or AMX)."""
    if dev.type == "cuda":
        return bf16_supported(dev)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # torch.cpu's probe
    return dev.type == "cpu" and (avx512_bf16() or has_amx())


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch.cpu's probe; False where torch lacks it)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def weight_dtype(name: str, dev: torch.device) -> torch.dtype:
    """model.dtype -> torch dtype; auto = bf16 on CUDA with bf16 support, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(dev) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_dtype(precision: str, dev: torch.device, native_bf16: bool | None = None) -> torch.dtype | None:
    """train.precision -> autocast dtype (None = no autocast); auto = bf16 where its matmuls are native.

    Native: CUDA with bf16, or a CPU with AVX512-BF16/AMX (`fast_bf16`, or `native_bf16` when given, e.g. by a
    test of the other kind of CPU). Elsewhere bf16 is emulated: an autocast Linear measured 7.5x slower than
    fp32 on an AVX2-only CPU, so auto trains in fp32 there (and on a CUDA GPU without bf16, as before).
    """
    if precision == "auto":
        native = fast_bf16(dev) if native_bf16 is None else native_bf16
        return torch.bfloat16 if native else None
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


# Dense bf16 (T4: fp16) tensor-core peak FLOP/s from the datasheets, by a fragment of the lower-cased CUDA
# device name, first match first ("h200" before "h100"). The one table: plan/devices.py: DEVICES names its
# GPUs by these keys.
GPU_PEAK_FLOPS = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "4090": 165e12, "t4": 65e12}


def measure_peak_flops(device, bf16: bool = False, cache: Path | None = None) -> float:
    """Peak matmul FLOP/s of `device`: datasheet bf16 for known GPUs, else the best of short timings.

    Timed once per process, the best kept in `cache` (a JSON file). On CPU it times what a training step
    runs: an fp32 nn.Linear, under bf16 autocast when `bf16` (the weight cast included), not a raw bf16 GEMM,
    which is 15x slower than that where bf16 is emulated (AVX2-only CPUs).
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
    bf16 = bf16 or device.type == "cuda"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else os.cpu_count()
    key = f"{device.type}:{where}:{torch.get_num_threads()}"
    # not ':bf16', the raw GEMM older versions cached
    key += ":autocast-bf16" if bf16 and device.type != "cuda" else ""
    cached = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if (str(cache), key) not in _TIMED_HERE:
        # Timed again once per process (about a second) and the best kept: a timing taken while the machine
        # was busy only ever under-measures the peak, and a low cached peak made MFU read above 1 (1.5
        # measured).
        _TIMED_HERE.add((str(cache), key))
        cached[key] = max(cached.get(key, 0.0), _matmul_flops(device, torch.bfloat16 if bf16 else None))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(cached, indent=1))
    return cached[key]


_TIMED_HERE: set[tuple[str, str]] = set()  # (cache file, key) timed in this process


def _matmul_flops(device, amp: torch.dtype | None, budget_s: float = 1.0) -> float:
    """Best of a few square matmuls: bf16 GEMMs on CUDA (4096^2); on CPU an fp32 1024^2 Linear under `amp`.

    Rounds stop once `budget_s` is spent (after two), so an emulated bf16 path costs about a second, not ten.
    """
    n = 4096 if device.type == "cuda" else 1024
    # The operands come from their own generator and the Linear is built on a forked RNG: a run times this
    # after seeding (and a resume after restoring the RNG), so it must not move the global random state.
    gen = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        w, x = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
        op = w.matmul
    else:
        with torch.random.fork_rng(devices=[]):
            op = torch.nn.Linear(n, n, bias=False)
        x = torch.randn(n, n, generator=gen)
    best, spent, rounds = float("inf"), 0.0, 0
    with torch.no_grad():
        op(x)  # first call: kernel selection, allocations
        while rounds < 5 and (rounds < 2 or spent < budget_s):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(4):
                with autocast(amp, device):
                    op(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            best, spent, rounds = min(best, dt / 4), spent + dt, rounds + 1
    return 2 * n**3 / best


def reset_peak_rss() -> int | None:
    """Restart this process's peak-RSS record from now (Linux VmHWM); the RSS now, None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak resident set size to the current one (Linux >= 4.0)
        return proc_status_bytes("VmRSS")
    except OSError:
        return None


def proc_status_bytes(key: str) -> int:
    """A size field of /proc/self/status ("VmRSS", "VmHWM": the peak RSS since start or reset) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))  # reported in kB


def reset_peak_memory(dev: torch.device) -> int | None:
    """Start a peak-memory window: the CUDA allocator's peak, or on CPU the process's peak RSS (Linux).

    Returns what the window's peak is measured above: 0 on CUDA (allocated tensor bytes), the RSS now on CPU
    (so Python, the libraries and what was loaded before do not count), None where the peak cannot be reset.
    """
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return 0
    return reset_peak_rss()


def peak_memory_since(dev: torch.device, start: int | None) -> int | None:
    """Peak bytes in the window `reset_peak_memory` started (`start`: what it returned); None unsupported."""
    if start is None:
        return None
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    # the reset sets the peak to the RSS of that instant and `start` is read just after: pages touched in
    # between can put `start` a few KiB above a window that never grew (0, not a negative peak)
    return max(0, proc_status_bytes("VmHWM") - start)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if dist_info().is_main:
        print(*args, **kwargs)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE is set (read at call time)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)
