"""The hardware a plan is for: named GPUs (capacity, datasheet peak), this machine, calibrated peak FLOP/s."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tunesmith.config import Config, UserError
from tunesmith.model.resolve import cache_root
from tunesmith.runtime import GPU_PEAK_FLOPS

GiB = 2**30
USABLE = 0.92  # CUDA context, allocator fragmentation and cuBLAS workspaces take the rest
# name -> (memory GiB, datasheet peak FLOP/s from runtime's table)
DEVICES = {
    "t4-16gb": (16, GPU_PEAK_FLOPS["t4"]),
    "rtx4090-24gb": (24, GPU_PEAK_FLOPS["4090"]),
    "a100-40gb": (40, GPU_PEAK_FLOPS["a100"]),
    "l40s-48gb": (48, GPU_PEAK_FLOPS["l40s"]),
    "h100-80gb": (80, GPU_PEAK_FLOPS["h100"]),
    "h200-141gb": (141, GPU_PEAK_FLOPS["h200"]),
}
NO_BF16 = frozenset({"t4-16gb"})  # Turing: fp16 tensor cores only; planned without bf16 autocast
PEAK_CACHE = "peak_flops.json"  # runtime.measure_peak_flops's cache: {key: best FLOP/s}
PEAK_DATES = "peak_flops_dates.json"  # beside it: {key: UTC date the best was timed}
_SOURCES: dict[tuple[str, str], str] = {}  # (cache file, key) -> where this process's peak came from


def host_ram_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrated_peak_flops(dev, bf16: bool = False) -> float:
    """Peak matmul FLOP/s of `dev` as plans and MFU use it: datasheet, or the best timing of this machine.

    On CPU: an fp32 Linear, under bf16 autocast when `bf16` (runtime.measure_peak_flops times it again once
    per process, about a second, and keeps the best of that and the cache). Where the figure came from (the
    table, measured now, or cached from a date) is kept for `peak_source`.
    """
    import torch

    from tunesmith.runtime import measure_peak_flops

    dev = torch.device(dev)
    path = cache_root(None) / PEAK_CACHE
    key = peak_key(dev, bf16)
    before = _read_json(path).get(key)
    peak = measure_peak_flops(dev, bf16, path)
    if (str(path), key) in _SOURCES:  # already decided in this process (runtime times once per process)
        return peak
    if dev.type == "cuda" and any(k in torch.cuda.get_device_name(dev).lower() for k in GPU_PEAK_FLOPS):
        _SOURCES[str(path), key] = "datasheet (runtime.GPU_PEAK_FLOPS)"
    elif before is None or peak > before:
        _SOURCES[str(path), key] = f"measured now ({_stamp_date(key)})"
    else:  # the timing just taken was lower (a busy machine): the best earlier one stands
        when = _read_json(path.with_name(PEAK_DATES)).get(key, "an earlier run")
        _SOURCES[str(path), key] = f"cached from {when} (best timing so far; this run's was not higher)"
    return peak


def peak_key(dev, bf16: bool = False) -> str:
    """The key of `dev`'s peak in peak_flops.json, as runtime.measure_peak_flops writes it."""
    import torch

    dev = torch.device(dev)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else os.cpu_count()
    key = f"{dev.type}:{where}:{torch.get_num_threads()}"
    return key + (":autocast-bf16" if bf16 and dev.type != "cuda" else "")


def peak_source(dev, bf16: bool = False) -> str:
    """Where calibrated_peak_flops(dev, bf16) got its figure: datasheet, measured now, or cached (a date)."""
    key = (str(cache_root(None) / PEAK_CACHE), peak_key(dev, bf16))
    return _SOURCES.get(key, "measured (source not recorded in this process)")


def remeasure_peak_flops(dev, bf16: bool, budget_s: float = 0.5) -> float:
    """Time the peak again now (a run whose MFU read above 1 was given too low a peak); the best is cached."""
    import torch

    from tunesmith.runtime import _matmul_flops

    # runtime.measure_peak_flops times once per process; this is the second, deliberate timing
    dev = torch.device(dev)
    fresh = _matmul_flops(dev, torch.bfloat16 if bf16 and dev.type != "cuda" else None, budget_s=budget_s)
    path, key = cache_root(None) / PEAK_CACHE, peak_key(dev, bf16)
    cached = _read_json(path)
    if fresh > cached.get(key, 0.0):
        cached[key] = fresh
        _write_json(path, cached)
        _SOURCES[str(path), key] = f"measured now, again during the run ({_stamp_date(key)})"
    return max(fresh, cached.get(key, 0.0))


def _stamp_date(key: str) -> str:
    """Record now as the date of `key`'s best timing; returns it."""
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = cache_root(None) / PEAK_DATES
    dates = _read_json(path)
    dates[key] = now
    _write_json(path, dates)
    return now


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or cut short: as if empty (the peak is timed again)
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    except OSError:  # a read-only cache: the figure still serves this run
        pass


def target_device(cfg: Config) -> dict:
    """The device planned for: a named GPU from DEVICES, or the device this process would train on."""
    import torch

    from tunesmith.runtime import device, fast_bf16

    name = cfg.plan.device
    if name is not None:
        if name not in DEVICES:
            raise UserError(f"plan.device: unknown device '{name}' (known: {', '.join(DEVICES)})")
        gib, peak = DEVICES[name]
        bf16 = name not in NO_BF16
        return {
            "name": name,
            "cuda": True,
            "bf16": bf16,
            "capacity": gib * GiB,
            "usable": gib * GiB * USABLE,
            "peak_flops": peak,
            "peak_source": f"datasheet ({name}, plan.device)",
            "autocast": _autocast_name(cfg.train.precision, bf16),
        }
    dev = device()
    native = fast_bf16(dev)  # CUDA: bf16 support; CPU: AVX512-BF16/AMX
    autocast = _autocast_name(cfg.train.precision, native)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_properties(dev).total_memory
        return {
            "name": torch.cuda.get_device_name(dev),
            "cuda": True,
            "bf16": native,
            "capacity": cap,
            "usable": cap * USABLE,
            "peak_flops": calibrated_peak_flops(dev),
            "peak_source": peak_source(dev),
            "autocast": autocast,
        }
    ram = host_ram_bytes()
    # the operation the run's matmuls really are: an fp32 Linear, under bf16 autocast when the run uses it
    peak = calibrated_peak_flops(dev, bf16=autocast == "bf16")
    return {
        "name": "cpu",
        "cuda": False,
        "bf16": native,
        "capacity": ram,
        "usable": ram * 0.8,
        "peak_flops": peak,
        "peak_source": peak_source(dev, bf16=autocast == "bf16"),
        "autocast": autocast,
    }


def _autocast_name(precision: str, native_bf16: bool) -> str:
    """The autocast train.precision uses where bf16 is (or is not) native: bf16, fp16 or fp32 (none)."""
    import torch

    from tunesmith.runtime import autocast_dtype

    # `native_bf16` decides, not the device
    dtype = autocast_dtype(precision, torch.device("cpu"), native_bf16)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
