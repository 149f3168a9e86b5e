"""AdamW with decay only on matrices, and the schedule: how many steps, warmup, decay."""

from __future__ import annotations

import math

import torch

from tunesmith.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable params; norms and biases (ndim < 2) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type in ("cuda", "cpu")
    )


def total_steps(tc: TrainConfig, batches_per_epoch: int, micro_per_step: int) -> int:
    """train.max_steps, else enough optimizer steps for train.epochs passes over the micro-batches."""
    return tc.max_steps or max(1, -(-int(tc.epochs * batches_per_epoch) // micro_per_step))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """warmup_steps if set, else warmup_ratio of the total."""
    return cfg.warmup_steps or int(round(cfg.warmup_ratio * total))


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then constant / linear / cosine to 0.

    >>> [round(lr_factor(s, 4, 2, "linear"), 2) for s in range(4)]
    [0.5, 1.0, 1.0, 0.5]
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over lr_factor; its state (last_epoch) is checkpointed with the optimizer."""
    w = warmup_steps(cfg, total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, w, cfg.scheduler))
