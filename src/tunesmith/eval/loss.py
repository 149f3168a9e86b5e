"""Token-level cross-entropy over label tokens: the training loss and the eval loss/perplexity are one function."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunesmith.data.pack import collate, epoch_batches
from tunesmith.data.render import IGNORE
from tunesmith.runtime import autocast


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token losses over label tokens, and their count (for normalising across micro-batches)."""
    labels = batch["labels"]
    if "position_ids" in batch:
        # Packed rows: no attention mask and no cache, so transformers isolates samples by position_ids.
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    target = labels[:, 1:].clone()  # (B, T-1)
    if "position_ids" in batch:
        # The last token of one packed sample must not learn the first token of the next one.
        target[batch["position_ids"][:, 1:] == 0] = IGNORE
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total, (target != IGNORE).sum()


@torch.no_grad()
def evaluate_loss(model, samples: list[dict], batch_size: int, seq_len: int, pad_id: int, packing: bool,
                  device: torch.device, amp_dtype: torch.dtype | None = None, shard: tuple[int, int] = (0, 1)) -> dict:
    """Mean loss and perplexity over the label (answer) tokens of `samples`; `shard`=(rank, world) splits the work."""
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
