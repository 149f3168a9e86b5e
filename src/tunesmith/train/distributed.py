"""torchrun integration: process group, DDP or FSDP2 wrapping. The loop body does not change."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tunesmith.runtime import Dist


def init(d: Dist, device: torch.device) -> None:
    """Create the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    if d.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def wrap(model: torch.nn.Module, d: Dist, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """DDP by default, FSDP2 (fully_shard per decoder layer, then the root) if asked; identity at world=1."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # Decoder blocks are the natural sharding unit; transformers names them in _no_split_modules.
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return getattr(model, "module", model)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (no-op for one process)."""
    if d.world > 1:
        dist.all_reduce(t)
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
