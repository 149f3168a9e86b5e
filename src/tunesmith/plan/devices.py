"""The hardware a plan is for: named GPUs (capacity, datasheet peak), this machine, calibrated peak FLOP/s."""

from __future__ import annotations

import os

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


def host_ram_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrated_peak_flops(dev, bf16: bool = False) -> float:
    """Peak matmul FLOP/s of `dev` as plans and MFU use it: datasheet, or a timing measured once per machine.

    On CPU: an fp32 Linear, under bf16 autocast when `bf16` (runtime.measure_peak_flops).
    """
    from tunesmith.runtime import measure_peak_flops

    return measure_peak_flops(dev, bf16, cache_root(None) / "peak_flops.json")


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
        "autocast": autocast,
    }


def _autocast_name(precision: str, native_bf16: bool) -> str:
    """The autocast train.precision uses where bf16 is (or is not) native: bf16, fp16 or fp32 (none)."""
    import torch

    from tunesmith.runtime import autocast_dtype

    # `native_bf16` decides, not the device
    dtype = autocast_dtype(precision, torch.device("cpu"), native_bf16)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
