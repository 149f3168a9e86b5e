"""The architecture a plan is made of: every Linear's shape, exact parameter counts, FLOPs per token.

Conventions (also in every plan.json under "formulas"):
- 1 FLOP = one multiply or one add; a (m x k) @ (k x n) matmul costs 2mkn. Elementwise ops (norms, softmax,
  activations) are not counted, as in FlopCounterMode and the usual MFU definition.
- Forward per token: 2 * sum(in*out of every decoder Linear) + 4*L*T*H*hd for QK^T and PV over the full T x T
  (what eager/SDPA kernels compute; no causal halving), plus the LM head (tied or not) at the positions that
  predict a label only: our loss skips it elsewhere, so 2*H*V per token is scaled by the data's label
  fraction.
  Full fine-tune: backward = 2 x forward (input grads + weight grads), so fwd+bwd = 6*N_matmul + 12*L*T*H*hd.
  LoRA: frozen Linears need input grads only (1 x), none where the input needs no grad (layer 0 reads the
  frozen embedding); adapters cost 2r(in+out) forward and twice that backward.
  Gradient checkpointing recomputes every decoder layer's forward once: hardware FLOPs = model FLOPs + that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.config import LoraConfig, UserError

_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "smollm3", "granite"}


@dataclass(frozen=True)
class Linear:
    name: str  # full module name, as PEFT matches it
    fan_in: int
    fan_out: int
    bias: bool
    layer: int  # -1 for the LM head
    reads_input: (
        bool  # its input is the decoder layer's input (no grad in layer 0 when embeddings are frozen)
    )


@dataclass(frozen=True)
class Arch:
    """The shapes that parameters, FLOPs and memory depend on."""

    family: str
    vocab: int
    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    tied: bool
    linears: tuple[Linear, ...]  # every decoder Linear plus the LM head (name "lm_head")
    other_params: int  # embeddings, norms: everything that is not a Linear


def arch_from_config(config) -> Arch:
    """Shapes of a transformers config (or a dict with model_type); exact for GPT-NeoX and Llama-likes."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config)
    mt = config.model_type
    if mt != "gpt_neox" and mt not in _LLAMA_LIKE:
        raise UserError(
            f"plan: model_type '{mt}' is not modelled (supported: gpt_neox, {', '.join(sorted(_LLAMA_LIKE))})"
        )
    d, L, H, V = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size
    kv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or d // H
    ff, tied = config.intermediate_size, bool(getattr(config, "tie_word_embeddings", False))
    layer_linears = (
        _neox_layer(config, d, H * hd, ff)
        if mt == "gpt_neox"
        else _llama_layer(config, d, H * hd, kv * hd, ff)
    )
    linears = [
        Linear(f"{prefix}.layers.{i}.{n}", a, b, bias, i, r)
        for i in range(L)
        for prefix, n, a, b, bias, r in layer_linears
    ]
    linears.append(Linear("lm_head", d, V, False, -1, False))
    norm = 2 * d if mt == "gpt_neox" else d  # LayerNorm weight+bias vs RMSNorm weight
    qk_norm = 2 * hd if mt == "qwen3" else 0
    other = V * d + L * (2 * norm + qk_norm) + norm  # embedding + norms (a tied head adds nothing)
    return Arch(mt, V, d, L, H, kv, hd, ff, tied, tuple(linears), other)


def _neox_layer(c, d: int, dq: int, ff: int) -> list[tuple]:
    bias = getattr(c, "attention_bias", True)
    parallel = getattr(c, "use_parallel_residual", True)  # then the MLP also reads the layer input
    return [
        ("gpt_neox", "attention.query_key_value", d, 3 * dq, bias, True),
        ("gpt_neox", "attention.dense", dq, d, bias, False),
        ("gpt_neox", "mlp.dense_h_to_4h", d, ff, True, parallel),
        ("gpt_neox", "mlp.dense_4h_to_h", ff, d, True, False),
    ]


def _llama_layer(c, d: int, dq: int, dkv: int, ff: int) -> list[tuple]:
    qkv_bias = True if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False))
    o_bias = False if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False))
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    return [
        ("model", "self_attn.q_proj", d, dq, qkv_bias, True),
        ("model", "self_attn.k_proj", d, dkv, qkv_bias, True),
        ("model", "self_attn.v_proj", d, dkv, qkv_bias, True),
        ("model", "self_attn.o_proj", dq, d, o_bias, False),
        ("model", "mlp.gate_proj", d, ff, mlp_bias, False),
        ("model", "mlp.up_proj", d, ff, mlp_bias, False),
        ("model", "mlp.down_proj", ff, d, mlp_bias, False),
    ]


def lora_targets(arch: Arch, lora: LoraConfig) -> list[Linear]:
    """The Linears PEFT adapts: 'all-linear' = all but the head; a list: name suffixes; a string: a regex."""
    t = lora.target_modules
    if t == "all-linear":
        return [x for x in arch.linears if x.layer >= 0]
    if isinstance(t, str):
        return [x for x in arch.linears if re.fullmatch(t, x.name)]
    return [x for x in arch.linears if any(x.name == k or x.name.endswith("." + k) for k in t)]


def param_counts(arch: Arch, lora: LoraConfig | None = None) -> dict:
    """Exact parameter counts: total, trainable, LoRA adapters, modules_to_save copies."""
    base = arch.other_params + sum(
        x.fan_in * x.fan_out + (x.fan_out if x.bias else 0)
        for x in arch.linears
        if not (x.layer < 0 and arch.tied)
    )
    if lora is None:
        return {"total": base, "trainable": base, "lora": 0, "saved_modules": 0}
    adapters = sum(lora.r * (x.fan_in + x.fan_out) for x in lora_targets(arch, lora))
    saved = 0  # PEFT keeps the original and trains a full copy of each module in modules_to_save
    for m in lora.modules_to_save or []:
        if m in ("lm_head", "embed_tokens", "embed_in"):  # each V x d
            saved += arch.d * arch.vocab
        else:
            raise UserError(
                f"plan: lora.modules_to_save '{m}' is not modelled (lm_head, embed_tokens, embed_in)"
            )
    return {
        "total": base + adapters + saved,
        "trainable": adapters + saved,
        "lora": adapters,
        "saved_modules": saved,
    }


def flops_per_token(
    model_config,
    seq_len: int,
    lora: bool | LoraConfig = False,
    gradient_checkpointing: bool = False,
    label_fraction: float = 1.0,
) -> dict:
    """Forward, backward, recompute FLOPs per token; 'model' (for MFU) and 'hardware' (with recompute).

    `label_fraction`: share of tokens whose position predicts a label; the LM head runs there only.
    """
    arch = model_config if isinstance(model_config, Arch) else arch_from_config(model_config)
    lcfg = LoraConfig() if lora is True else (lora or None)
    attn = 4 * arch.layers * seq_len * arch.heads * arch.head_dim  # QK^T and PV per token, forward
    mm = {x: 2 * x.fan_in * x.fan_out for x in arch.linears}
    mm[arch.linears[-1]] = round(mm[arch.linears[-1]] * label_fraction)
    fwd = sum(mm.values()) + attn
    if lcfg is None:
        bwd = 2 * fwd
        layer_fwd = fwd - mm[arch.linears[-1]]
    else:
        targets = set(lora_targets(arch, lcfg))
        adapter = {x: 2 * lcfg.r * (x.fan_in + x.fan_out) for x in targets}
        no_dgrad = {x for x in arch.linears if x.layer == 0 and x.reads_input and not gradient_checkpointing}
        head_wgrad = mm[arch.linears[-1]] if "lm_head" in (lcfg.modules_to_save or []) else 0
        fwd += sum(adapter.values())
        bwd = sum(v for x, v in mm.items() if x not in no_dgrad) + head_wgrad + 2 * attn
        bwd += sum(2 * v - (2 * lcfg.r * x.fan_in if x in no_dgrad else 0) for x, v in adapter.items())
        layer_fwd = fwd - mm[arch.linears[-1]]
    recompute = layer_fwd if gradient_checkpointing else 0
    return {
        "forward": fwd,
        "backward": bwd,
        "recompute": recompute,
        "model": fwd + bwd,
        "hardware": fwd + bwd + recompute,
        "attention_forward": attn,
        "formula": (
            "fwd = 2*sum(decoder Linear in*out) + 2*H*V*label_fraction + 4*L*T*H*hd; full: bwd = 2*fwd"
        ),
    }
