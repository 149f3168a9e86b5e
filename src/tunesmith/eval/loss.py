"""Evaluation loss and perplexity over a held-out split, with the training loss (model/loss.py)."""

from __future__ import annotations

import math

import torch

from tunesmith.data.pack import collate, epoch_batches
from tunesmith.model.loss import loss_sum
from tunesmith.runtime import autocast


@torch.no_grad()
def evaluate_loss(
    model,
    samples: list[dict],
    batch_size: int,
    seq_len: int,
    pad_id: int,
    packing: bool,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Mean loss and perplexity over the label (answer) tokens of `samples`; `shard`=(rank, world)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    lengths = [len(s["input_ids"]) for s in samples]
    batches = epoch_batches(lengths, batch_size, seq_len, packing, seed=0, epoch=0)
    for rows in batches[shard[0] :: shard[1]]:
        batch = {k: v.to(device) for k, v in collate(samples, rows, pad_id, packing).items()}
        with autocast(amp_dtype, device):
            s, n = loss_sum(model, batch)
        total += s
        count += n
    if shard[1] > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    model.train(was_training)
    loss = (total / count.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count.item())}
