"""loss_sum runs the LM head only where a label is: same loss and gradients as the full-vocabulary one."""

import pytest
import torch
import torch.nn.functional as F

from tests import tiny
from tunesmith.config import LoraConfig
from tunesmith.data.formats import Example, get_template
from tunesmith.data.pack import collate_packed, collate_padded
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, render
from tunesmith.model import loss as loss_mod
from tunesmith.model.lora import apply_lora
from tunesmith.model.loss import loss_sum

PAIRS = [
    ("What was the revenue?", "It was 42 percent."),
    ("How many employees?", "1,200 employees."),
    ("hello", "world the answer is 42"),
]


def batch_of(tok, packed: bool) -> dict:
    exs = [Example(where=f"t:{i}", fields={"question": q, "answer": a}) for i, (q, a) in enumerate(PAIRS)]
    samples = render(exs, get_template("qa", "qa"), tok, 512, "right", Rejects("fail", None))
    if packed:  # two rows: [0, 1] packed together, [2] alone (so the second row has padding too)
        return collate_packed(samples, [[0, 1], [2]], tok.pad_token_id)
    return collate_padded(samples, [[0], [1], [2]], tok.pad_token_id)


def reference(model, batch: dict, smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """The textbook loss: full (B, T, V) logits, shift by one, mask prompts, padding and packed boundaries."""
    if "position_ids" in batch:
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    else:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    target = batch["labels"][:, 1:].clone()
    if "position_ids" in batch:
        target[batch["position_ids"][:, 1:] == 0] = IGNORE
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
        label_smoothing=smoothing,
    )
    return total, int((target != IGNORE).sum())


def grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


MODELS = {
    "neox": tiny.gpt_neox,
    "llama-tied": lambda: tiny.llama(tie_word_embeddings=True),
    "llama-lora": lambda: apply_lora(tiny.llama(), LoraConfig(r=4, dropout=0.0)),
    "neox-bias": lambda: with_bias(tiny.gpt_neox()),
}


def with_bias(model):
    """GPT-NeoX with a biased output layer (as some heads have), initialised non-zero."""
    torch.manual_seed(1)
    old = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Linear(old.in_features, old.out_features, bias=True))
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_head_only_at_labels_matches_full_logits(tok, name, packed, fused, monkeypatch):
    if not fused:  # as for a model type that post-processes its logits: the head runs inside the model
        monkeypatch.setattr(loss_mod, "FUSED_HEAD_FAMILIES", frozenset())
    model = MODELS[name]()
    batch = batch_of(tok, packed)
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, a, o: head_inputs.append(a[0].shape)
    )
    s, n = loss_sum(model, batch)
    handle.remove()
    ref, ref_n = reference(model, batch)

    # The head saw only the label positions (N, H), or none when fused: not (B, T, H) — else this test
    # would compare a path with itself.
    assert head_inputs[0][0] == (0 if fused else ref_n) and ref_n == int(n) > 0
    assert len(head_inputs[0]) == 2
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-6)
    g, g_ref = grads(model, s), grads(model, ref)
    assert g.keys() == g_ref.keys() and g
    for name in g:
        # fp32 rounding of different summation orders: ~1e-7 of the tensor's largest gradient
        scale = float(g_ref[name].abs().max())
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-6 * max(scale, 1.0), rtol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("name", ["neox-bias", "llama-lora"])
def test_label_smoothing_matches_torch(tok, name, fused, monkeypatch):
    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_VALUES", 400 * 5)  # fused: several chunks
    if not fused:
        monkeypatch.setattr(loss_mod, "FUSED_HEAD_FAMILIES", frozenset())
    model = MODELS[name]()
    batch = batch_of(tok, packed=True)
    s, _ = loss_sum(model, batch, smoothing=0.1)
    ref, _ = reference(model, batch, smoothing=0.1)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-6)
    g, g_ref, g_plain = grads(model, s), grads(model, ref), grads(model, reference(model, batch)[0])
    for k in g:
        scale = float(g_ref[k].abs().max())
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-6 * max(scale, 1.0), rtol=1e-5, msg=k)
    # and smoothing really moved the update (the targets are 0.9 / 0.1 spread, not one-hot)
    assert (
        max(float((g[k] - g_plain[k]).abs().max() / g_plain[k].abs().max().clamp(min=1e-12)) for k in g)
        > 0.05
    )


def test_fused_loss_in_chunks_under_bf16_autocast(tok, monkeypatch):
    monkeypatch.setattr(
        loss_mod, "LOSS_CHUNK_VALUES", 400 * 5
    )  # 5 rows per chunk: several chunks and a ragged last one
    model = tiny.gpt_neox()
    batch = batch_of(tok, packed=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, n = loss_sum(model, batch)
        ref, _ = reference(model, batch)
    assert int(n) > 10
    torch.testing.assert_close(s, ref, rtol=2e-3, atol=0)  # bf16 matmuls on both sides, fp32 softmax
    g, g_ref = grads(model, s), grads(model, ref)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=2e-2, atol=2e-3, msg=name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # eval: the loss only, same value
        torch.testing.assert_close(loss_sum(model, batch)[0], s.detach())


def test_fused_loss_of_a_batch_without_labels_is_zero(tok):
    model = tiny.gpt_neox()
    batch = batch_of(tok, packed=True)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)  # e.g. every answer truncated away
    s, n = loss_sum(model, batch)
    assert int(n) == 0 and float(s) == 0.0
    s.backward()
    head = model.get_output_embeddings()
    assert head.weight.grad is not None and not head.weight.grad.any()
    assert "forward" not in vars(head)  # the head's own forward is back after the fused call


def test_take_leaves_a_head_input_of_another_shape_to_the_head():
    head, keep = torch.nn.Linear(4, 6), torch.ones(2, 3, dtype=torch.bool)
    x = torch.randn(5, 4)  # not (B, T, H) = (2, 3, 4): nothing is taken, the head runs as usual
    with loss_mod._head_only_at(head, keep, take=True) as taken:
        out = head(x)
    assert taken == [] and torch.equal(out, F.linear(x, head.weight, head.bias))


def test_fsdp2_sharded_head_takes_the_generic_path(tok, monkeypatch):
    # Under FSDP2 the head's weight is a sharded DTensor outside the head's own forward: never fused.
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    batch = batch_of(tok, packed=True)
    expected, _ = loss_sum(tiny.llama(), batch)  # fused, unsharded
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny.llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert not loss_mod._fusable(model, model.get_output_embeddings())
        s, n = loss_sum(model, batch)
        s.backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(s, expected, atol=1e-5, rtol=1e-6)
    assert int(n) > 0


def test_fused_loss_keeps_one_chunk_of_logits_alive(monkeypatch):
    # 64 label rows, 8 per chunk: 8 chunks of (8, 4096) fp32 logits = 128 KiB each. The peak the CPU allocator
    # sees inside the loss is one chunk (plus the (64, 16) hidden gradient and per-row scalars), not two.
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_VALUES", 8 * 4096)
    torch.manual_seed(0)
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(4096, 16)
    target = torch.randint(0, 4096, (64,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_mod.linear_cross_entropy(hidden, weight, None, target)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    peak, live = 0, 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    chunk = 8 * 4096 * 4
    assert chunk < peak < 1.25 * chunk
