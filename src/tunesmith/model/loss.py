"""The token loss: next-token cross-entropy over label tokens, with the LM head fused into it where it can be.

One function for training (train/loop.py), evaluation (eval/loss.py) and the planner's model of it
(plan/memory.py reads FUSED_HEAD_FAMILIES and LOSS_CHUNK_VALUES from here, so the plan models the loss that
runs).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tunesmith.data.render import IGNORE


def next_token_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) targets: position t predicts token t+1; prompts, padding, packed-sample starts are IGNORE."""
    target = batch["labels"][:, 1:]
    if "position_ids" in batch:
        # The last token of one packed sample must not learn the first token of the next one.
        target = target.masked_fill(batch["position_ids"][:, 1:] == 0, IGNORE)
    return target


def label_fraction(samples: list[dict]) -> float:
    """Share of tokens whose position predicts a label (there loss and LM head run); 1.0 without samples."""
    tokens = sum(len(s["input_ids"]) for s in samples)
    # a sample's first token is never predicted, so a label there has no position predicting it
    labelled = sum(len(lab) - lab.count(IGNORE) - (lab[0] != IGNORE) for s in samples if (lab := s["labels"]))
    return labelled / tokens if tokens else 1.0


def loss_sum(
    model, batch: dict[str, torch.Tensor], smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token losses over label tokens, and their count (for normalising across micro-batches).

    `smoothing` e > 0: each token's loss is (1-e) x cross-entropy + e x the mean of -log p over the vocabulary
    (torch's and HF Trainer's label smoothing), for training; evaluation uses the plain loss.
    """
    target = next_token_targets(batch)
    # keep[:, t]: hidden state t predicts a label, so only there is the LM head worth running (B, T).
    keep = F.pad(target != IGNORE, (0, 1), value=False)
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    with _head_only_at(head, keep, take=_fusable(core, head)) as taken:
        if "position_ids" in batch:
            # Packed rows: no attention mask and no cache, so transformers isolates samples by position_ids.
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if taken:  # the head's (N, H) input, taken from the model: head and loss run fused, chunk by chunk
        target = target[keep[:, :-1]]
        return linear_cross_entropy(taken[0], head.weight, head.bias, target, smoothing), target.new_tensor(
            target.numel()
        )
    if out.logits.dim() == 2:  # (N, V): the head ran on the kept positions only, in row-major order
        logits, target = out.logits.float(), target[keep[:, :-1]]
    else:  # (B, T, V): a model whose head input is not (B, T, H); same loss, computed everywhere
        logits, target = out.logits[:, :-1].float().flatten(0, 1), target.flatten()
    total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum", label_smoothing=smoothing)
    return total, (target != IGNORE).sum()


@contextmanager
def _head_only_at(head: torch.nn.Module | None, keep: torch.Tensor, take: bool = False):
    """Feed the output layer only the hidden states at `keep` (B, T); with `take`, none, and yield them.

    Prompt tokens carry no loss, yet the LM head (hidden x vocab) and the log-softmax over the vocabulary
    are the largest cost per position for small models; a pre-hook on the head gathers (B, T, H) -> (N, H)
    inside the model's own forward, so DDP, FSDP, PEFT and elementwise logit post-processing (scaling,
    soft-capping) all still apply. With `take` the head does not run (its logits have zero rows) and the
    caller gets the (N, H) states in the yielded list, to compute head and loss itself (`_fusable` heads
    only).
    """
    taken: list[torch.Tensor] = []
    if head is None:
        yield taken
        return

    def gather(module, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            return None
        if take:
            taken.append(hidden[keep])
            return (hidden[:0, 0],) + args[1:]
        return (hidden[keep],) + args[1:]

    handle = head.register_forward_pre_hook(gather)
    if take:  # once the states are taken, not even a zero-row matmul: it would still cast the (V, H) weight
        # and return a zero gradient; a head input gather did not recognise runs through the Linear as usual
        def forward(hidden: torch.Tensor) -> torch.Tensor:
            return hidden.new_zeros(0, head.out_features) if taken else torch.nn.Linear.forward(head, hidden)

        head.forward = forward
    try:
        yield taken
    finally:
        handle.remove()
        if take:
            del head.forward


# Model types whose forward returns the output layer's result as the logits, untouched (no scaling or
# soft-capping): for them the loss may be computed from the head's input and weights directly.
FUSED_HEAD_FAMILIES = frozenset({"gpt_neox", "llama", "mistral", "qwen2", "qwen3"})


def _fusable(core, head: torch.nn.Module | None) -> bool:
    """Whether head + loss of `core` (unwrapped model) can run fused.

    Only for a plain Linear head with local weights whose logits the model leaves untouched.
    """
    if (
        type(head) is not torch.nn.Linear
        or getattr(getattr(core, "config", None), "model_type", None) not in FUSED_HEAD_FAMILIES
    ):
        # LoRA-wrapped or quantized heads, and models that post-process logits, take the generic path
        return False
    # not e.g. an FSDP2 DTensor, gathered only inside the head's forward
    return type(head.weight) is torch.nn.Parameter


# Rows of logits per chunk: ~64M fp32 values (256 MB) at a time instead of all (N, V) at once. Each extra
# chunk costs a (V, H) cast-and-add of the weight gradient, so chunks are as large as memory comfortably
# allows.
LOSS_CHUNK_VALUES = 1 << 26


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """sum_i cross_entropy(hidden_i @ weight.T + bias, target_i, label_smoothing), never all (N, V) logits.

    hidden (N, H), weight (V, H), target (N,) with no IGNORE. Matmuls run in the autocast dtype when
    autocast is on (as the head would), softmax in fp32. The gradients are made chunk by chunk in the
    forward and kept ((N, H) and (V, H)), not the logits: no (N, V) log-softmax, casts or zero-fill.
    """
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not grads:
        return _LinearCrossEntropy.run(hidden, weight, bias, target, dtype, smoothing, (False, False, False))[
            0
        ]
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, dtype, smoothing)


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of `run`: forward computes loss and gradients, backward scales the gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, dtype, smoothing):
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        total, g_hidden, g_weight, g_bias = _LinearCrossEntropy.run(
            hidden, weight, bias, target, dtype, smoothing, need
        )
        ctx.save_for_backward(*(g for g in (g_hidden, g_weight, g_bias) if g is not None))
        ctx.need = need
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        out = [next(saved) * grad_total if n else None for n in ctx.need]
        return out[0], out[1], out[2], None, None, None

    @staticmethod
    def run(hidden, weight, bias, target, dtype, smoothing, need):
        """(loss sum, d/d hidden, d/d weight, d/d bias); a gradient is None where `need` says so."""
        n, vocab = hidden.shape[0], weight.shape[0]
        h, w = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_hidden = torch.empty_like(hidden) if need[0] else None
        g_weight = None  # the first chunk's matmul makes it: no (V, H) zero-fill and add
        g_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need[2] else None
        rows = max(1, LOSS_CHUNK_VALUES // vocab)
        for s in range(0, n, rows):
            h_c, t_c = h[s : s + rows], target[s : s + rows]
            logits = (h_c @ w.T).float()  # (n_c, V)
            if bias is not None:
                logits += bias.float()
            # the smoothed target: 1-e on the label, e/V on every entry; its cross-entropy is
            # lse - (1-e) * logit[label] - e * mean(logits)
            picked = logits.gather(1, t_c[:, None])[:, 0] * (1.0 - smoothing)
            if smoothing:
                picked += smoothing * logits.mean(-1)
            # log-sum-exp by hand, in place: each pass over the (n_c, V) values costs as much as a matmul here
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).exp_()
            z = e.sum(-1)
            total += (top[:, 0] + z.log() - picked).sum()
            if any(need):
                # d loss / d logits = softmax - smoothed target, made in place in the logits' memory
                probs = e.mul_(z.reciprocal()[:, None])
                if smoothing:
                    probs.sub_(smoothing / vocab)
                probs[torch.arange(len(t_c), device=probs.device), t_c] -= 1.0 - smoothing
                if g_bias is not None:
                    g_bias += probs.sum(0)
                g = probs.to(dtype)
                if g_hidden is not None:
                    g_hidden[s : s + rows] = g @ w
                if need[1]:
                    g_w = g.T @ h_c
                    g_weight = g_w.float() if g_weight is None else g_weight.add_(g_w)
            # free this chunk's (n_c, V) values before the next chunk's matmul makes its own: one chunk alive
            logits = e = probs = g = None
        if need[1] and g_weight is None:  # no rows at all
            g_weight = torch.zeros_like(weight)
        g_weight = g_weight.to(weight.dtype) if g_weight is not None else None
        g_bias = g_bias.to(bias.dtype) if g_bias is not None else None
        return total, g_hidden, g_weight, g_bias
