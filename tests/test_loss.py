"""loss_sum runs the LM head only where a label is: same loss and gradients as the full-vocabulary reference."""

import pytest
import torch
import torch.nn.functional as F

from tests import tiny
from tunesmith.config import LoraConfig
from tunesmith.data.formats import Example, get_template
from tunesmith.data.pack import collate_packed, collate_padded
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, render
from tunesmith.eval.loss import loss_sum
from tunesmith.model.lora import apply_lora

PAIRS = [("What was the revenue?", "It was 42 percent."), ("How many employees?", "1,200 employees."),
         ("hello", "world the answer is 42")]


def batch_of(tok, packed: bool) -> dict:
    exs = [Example(where=f"t:{i}", fields={"question": q, "answer": a}) for i, (q, a) in enumerate(PAIRS)]
    samples = render(exs, get_template("qa", "qa"), tok, 512, "right", Rejects("fail", None))
    if packed:  # two rows: [0, 1] packed together, [2] alone (so the second row has padding too)
        return collate_packed(samples, [[0, 1], [2]], tok.pad_token_id)
    return collate_padded(samples, [[0], [1], [2]], tok.pad_token_id)


def reference(model, batch: dict) -> tuple[torch.Tensor, int]:
    """The textbook loss: full (B, T, V) logits, shift by one, mask prompts, padding and packed boundaries."""
    if "position_ids" in batch:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    target = batch["labels"][:, 1:].clone()
    if "position_ids" in batch:
        target[batch["position_ids"][:, 1:] == 0] = IGNORE
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total, int((target != IGNORE).sum())


def grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("make", [tiny.gpt_neox, lambda: tiny.llama(tie_word_embeddings=True),
                                  lambda: apply_lora(tiny.llama(), LoraConfig(r=4, dropout=0.0))],
                         ids=["neox", "llama-tied", "llama-lora"])
def test_head_only_at_labels_matches_full_logits(tok, make, packed):
    model = make()
    batch = batch_of(tok, packed)
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_inputs.append(a[0].shape))
    s, n = loss_sum(model, batch)
    handle.remove()
    ref, ref_n = reference(model, batch)

    # The head saw only the label positions: (N, H), not (B, T, H) — else this test would compare a path with itself.
    assert head_inputs[0][0] == ref_n == int(n) > 0
    assert len(head_inputs[0]) == 2
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-6)
    g, g_ref = grads(model, s), grads(model, ref)
    assert g.keys() == g_ref.keys() and g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-5, msg=name)
