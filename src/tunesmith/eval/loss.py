"""Token-level cross-entropy over label tokens: the training loss and the eval loss/perplexity are one function."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tunesmith.data.pack import collate, epoch_batches
from tunesmith.data.render import IGNORE
from tunesmith.runtime import autocast


def next_token_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) targets: position t predicts token t+1; prompts, padding and packed-sample starts are IGNORE."""
    target = batch["labels"][:, 1:]
    if "position_ids" in batch:
        # The last token of one packed sample must not learn the first token of the next one.
        target = target.masked_fill(batch["position_ids"][:, 1:] == 0, IGNORE)
    return target


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token losses over label tokens, and their count (for normalising across micro-batches)."""
    target = next_token_targets(batch)
    # keep[:, t]: hidden state t predicts a label, so only there is the LM head worth running (B, T).
    keep = F.pad(target != IGNORE, (0, 1), value=False)
    with _head_only_at(model, keep):
        if "position_ids" in batch:
            # Packed rows: no attention mask and no cache, so transformers isolates samples by position_ids.
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if out.logits.dim() == 2:  # (N, V): the head ran on the kept positions only, in row-major order
        logits, target = out.logits.float(), target[keep[:, :-1]]
    else:  # (B, T, V): a model whose head input is not (B, T, H); same loss, computed everywhere
        logits, target = out.logits[:, :-1].float().flatten(0, 1), target.flatten()
    total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
    return total, (target != IGNORE).sum()


@contextmanager
def _head_only_at(model, keep: torch.Tensor):
    """Feed the output layer only the hidden states at `keep` (B, T) positions.

    Prompt tokens carry no loss, yet the LM head (hidden x vocab) and the log-softmax over the vocabulary
    are the largest cost per position for small models; a pre-hook on the head gathers (B, T, H) -> (N, H)
    inside the model's own forward, so DDP, FSDP, PEFT and elementwise logit post-processing (scaling,
    soft-capping) all still apply.
    """
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def gather(module, args):
        hidden = args[0]
        return (hidden[keep],) + args[1:] if hidden.shape[:2] == keep.shape else None

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


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
