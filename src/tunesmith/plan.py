"""`tunesmith plan`: parameters, FLOPs, memory and time of a fine-tune, from the model config alone.

Conventions (also in every plan.json under "formulas"):
- 1 FLOP = one multiply or one add; a (m x k) @ (k x n) matmul costs 2mkn. Elementwise ops (norms, softmax,
  activations) are not counted, as in FlopCounterMode and the usual MFU definition.
- Forward per token: 2 * sum(in*out of every decoder Linear) + 4*L*T*H*hd for QK^T and PV over the full T x T
  (what eager/SDPA kernels compute; no causal halving), plus the LM head (tied or not) at the positions that
  predict a label only: our loss skips it elsewhere, so 2*H*V per token is scaled by the data's label fraction.
  Full fine-tune: backward = 2 x forward (input grads + weight grads), so fwd+bwd = 6*N_matmul + 12*L*T*H*hd.
  LoRA: frozen Linears need input grads only (1 x), none where the input needs no grad (layer 0 reads the
  frozen embedding); adapters cost 2r(in+out) forward and twice that backward.
  Gradient checkpointing recomputes every decoder layer's forward once: hardware FLOPs = model FLOPs + that.
- Memory: tensor bytes (what torch.cuda.max_memory_allocated counts), not allocator fragmentation or the
  CUDA context; a device is usable up to USABLE of its capacity. Logits exist at label positions only, and
  for a plain head (model/loss.py's FUSED_HEAD_FAMILIES) one chunk of its LOSS_CHUNK_VALUES at a time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tunesmith.config import Config, LoraConfig, UserError
from tunesmith.model import loss as token_loss
from tunesmith.model.load import load_config_only
from tunesmith.model.resolve import cache_root
from tunesmith.runtime import GPU_PEAK_FLOPS

GiB = 2**30
USABLE = 0.92  # CUDA context, allocator fragmentation and cuBLAS workspaces take the rest
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 4-bit value + 8-bit absmax per 64 + fp32 per 256 blocks (double quant)
# name -> (memory GiB, datasheet peak FLOP/s from runtime's table)
DEVICES = {
    "t4-16gb": (16, GPU_PEAK_FLOPS["t4"]), "rtx4090-24gb": (24, GPU_PEAK_FLOPS["4090"]), "a100-40gb": (40, GPU_PEAK_FLOPS["a100"]),
    "l40s-48gb": (48, GPU_PEAK_FLOPS["l40s"]), "h100-80gb": (80, GPU_PEAK_FLOPS["h100"]), "h200-141gb": (141, GPU_PEAK_FLOPS["h200"]),
}
# the "what can I run" ladder: public shapes, no weights needed
LADDER = {
    "pythia-70m": dict(model_type="gpt_neox", hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, vocab_size=50304, rotary_pct=0.25, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, intermediate_size=13824, vocab_size=32000),
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648, vocab_size=152064),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672, vocab_size=128256),
}
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "smollm3", "granite"}
# Linears of one decoder layer that read the same tensor (one saved input between them)
_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}


@dataclass(frozen=True)
class Linear:
    name: str  # full module name, as PEFT matches it
    fan_in: int
    fan_out: int
    bias: bool
    layer: int  # -1 for the LM head
    reads_input: bool  # its input is the decoder layer's input (no grad in layer 0 when embeddings are frozen)


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
    """Shapes of a transformers config (or a dict with model_type); exact for GPT-NeoX and Llama-like models."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config)
    mt = config.model_type
    if mt != "gpt_neox" and mt not in _LLAMA_LIKE:
        raise UserError(f"plan: model_type '{mt}' is not modelled (supported: gpt_neox, {', '.join(sorted(_LLAMA_LIKE))})")
    d, L, H, V = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size
    kv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or d // H
    ff, tied = config.intermediate_size, bool(getattr(config, "tie_word_embeddings", False))
    layer_linears = _neox_layer(config, d, H * hd, ff) if mt == "gpt_neox" else _llama_layer(config, d, H * hd, kv * hd, ff)
    linears = [Linear(f"{prefix}.layers.{i}.{n}", a, b, bias, i, r) for i in range(L) for prefix, n, a, b, bias, r in layer_linears]
    linears.append(Linear("lm_head", d, V, False, -1, False))
    norm = 2 * d if mt == "gpt_neox" else d  # LayerNorm weight+bias vs RMSNorm weight
    qk_norm = 2 * hd if mt == "qwen3" else 0
    other = V * d + L * (2 * norm + qk_norm) + norm  # embedding + norms (a tied head adds nothing)
    return Arch(mt, V, d, L, H, kv, hd, ff, tied, tuple(linears), other)


def _neox_layer(c, d: int, dq: int, ff: int) -> list[tuple]:
    bias = getattr(c, "attention_bias", True)
    parallel = getattr(c, "use_parallel_residual", True)  # then the MLP also reads the layer input
    return [("gpt_neox", "attention.query_key_value", d, 3 * dq, bias, True),
            ("gpt_neox", "attention.dense", dq, d, bias, False),
            ("gpt_neox", "mlp.dense_h_to_4h", d, ff, True, parallel),
            ("gpt_neox", "mlp.dense_4h_to_h", ff, d, True, False)]


def _llama_layer(c, d: int, dq: int, dkv: int, ff: int) -> list[tuple]:
    qkv_bias = True if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False))
    o_bias = False if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False))
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    return [("model", "self_attn.q_proj", d, dq, qkv_bias, True), ("model", "self_attn.k_proj", d, dkv, qkv_bias, True),
            ("model", "self_attn.v_proj", d, dkv, qkv_bias, True), ("model", "self_attn.o_proj", dq, d, o_bias, False),
            ("model", "mlp.gate_proj", d, ff, mlp_bias, False), ("model", "mlp.up_proj", d, ff, mlp_bias, False),
            ("model", "mlp.down_proj", ff, d, mlp_bias, False)]


def lora_targets(arch: Arch, lora: LoraConfig) -> list[Linear]:
    """The Linears PEFT adapts: 'all-linear' = all but the head; a list matches name suffixes; a string is a regex."""
    t = lora.target_modules
    if t == "all-linear":
        return [x for x in arch.linears if x.layer >= 0]
    if isinstance(t, str):
        return [x for x in arch.linears if re.fullmatch(t, x.name)]
    return [x for x in arch.linears if any(x.name == k or x.name.endswith("." + k) for k in t)]


def param_counts(arch: Arch, lora: LoraConfig | None = None) -> dict:
    """Exact parameter counts: total, trainable, LoRA adapters, modules_to_save copies."""
    base = arch.other_params + sum(x.fan_in * x.fan_out + (x.fan_out if x.bias else 0) for x in arch.linears if not (x.layer < 0 and arch.tied))
    if lora is None:
        return {"total": base, "trainable": base, "lora": 0, "saved_modules": 0}
    adapters = sum(lora.r * (x.fan_in + x.fan_out) for x in lora_targets(arch, lora))
    saved = 0  # PEFT keeps the original and trains a full copy of each module in modules_to_save
    for m in lora.modules_to_save or []:
        if m in ("lm_head", "embed_tokens", "embed_in"):  # each V x d
            saved += arch.d * arch.vocab
        else:
            raise UserError(f"plan: lora.modules_to_save '{m}' is not modelled (lm_head, embed_tokens, embed_in)")
    return {"total": base + adapters + saved, "trainable": adapters + saved, "lora": adapters, "saved_modules": saved}


def flops_per_token(model_config, seq_len: int, lora: bool | LoraConfig = False, gradient_checkpointing: bool = False,
                    label_fraction: float = 1.0) -> dict:
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
    return {"forward": fwd, "backward": bwd, "recompute": recompute, "model": fwd + bwd,
            "hardware": fwd + bwd + recompute, "attention_forward": attn,
            "formula": "fwd = 2*sum(decoder Linear in*out) + 2*H*V*label_fraction + 4*L*T*H*hd; full: bwd = 2*fwd"}


@dataclass(frozen=True)
class Precision:
    """Bytes per element as our loop runs: params in model.dtype, autocast per train.precision."""

    weight: int  # parameter (and grad, AdamW moment) bytes
    act: int  # activation bytes
    autocast_copies: bool  # fp32 params under bf16/fp16 autocast: the cast weight copies live until backward
    fused_adam: bool  # fused AdamW (CUDA and CPU): no temporaries; else the per-tensor loop's temporaries of one tensor


def precision_for(cfg: Config, cuda: bool, bf16: bool) -> Precision:
    """What model.dtype/train.precision mean on a CUDA device or a CPU; `bf16`: its bf16 matmuls are native."""
    weight = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2 if (cuda and bf16) else 4}[cfg.model.dtype]
    auto = {"fp32": None, "bf16": 2, "fp16": 2, "auto": 2 if bf16 else None}[cfg.train.precision]  # runtime.autocast_dtype
    act = auto or weight
    return Precision(weight, act, weight == 4 and auto is not None, True)  # make_optimizer: fused on CUDA and CPU


def activation_bytes(arch: Arch, rows: int, seq_len: int, prec: Precision, attn: str = "sdpa",
                     lora: LoraConfig | None = None, checkpointing: bool = False) -> dict:
    """Saved-for-backward bytes of the decoder for a (rows, seq_len) micro-batch: layers, head input, recompute."""
    n, d, ff, H = rows * seq_len, arch.d, arch.ff, arch.heads
    dq, dkv = H * arch.head_dim, arch.kv_heads * arch.head_dim
    # per token per layer, counted with saved-tensor hooks on fp32 models (see tests/test_plan.py):
    # Llama-like: x, 2 norm outputs x2, q/attn-out/o-in (3 dq), k, v (2 dkv), gate, up, act, act*up (4 ff), lse (H)
    # GPT-NeoX: x, 2 LN outputs, fused qkv (3 dq), rotated q, k, attn out x2 (10 d in all), fc1 out, gelu out (2 ff)
    per = (10 * d + 2 * ff + H + 4) if arch.family == "gpt_neox" else (5 * d + 3 * dq + 2 * dkv + 4 * ff + H + 2)
    if attn == "eager":  # probabilities (H*T per token) kept for PV; GQA keys/values expanded to all heads
        per += H * seq_len + 2 * (dq - dkv)
    fp32_norm = 0 if prec.act == 4 else 4 * d * 2  # RMSNorm/LayerNorm upcast copies stay fp32 under bf16
    extra = 0
    if lora is not None:
        # Each adapter keeps lora_A's (N, r) output for lora_B, and lora_A's input when that is a tensor of
        # its own (dropout's output and mask; PEFT's fp32 copy of a bf16 base's input: adapters stay fp32);
        # the frozen base layers then keep none of their inputs, which `per` counted once per input.
        fp32_adapters = prec.weight == 2 and not prec.autocast_copies
        own_input = lora.dropout > 0 or fp32_adapters
        a_in = 4 if fp32_adapters else prec.act
        mask = 4 if lora.dropout > 0 else 0  # dropout's mask, in its input's dtype (fp32 here; CUDA: bool)
        targets = lora_targets(arch, lora)
        extra = sum(lora.r * a_in + (x.fan_in * (a_in + mask) if own_input else 0) for x in targets)
        if own_input:
            inputs = {(x.layer, _SHARED_INPUT.get(x.name.rsplit(".", 1)[-1], x.name)): x.fan_in for x in targets}
            extra -= sum(inputs.values()) * prec.act
        extra //= arch.layers
    layer = per * prec.act + fp32_norm + extra
    # checkpointing keeps only each layer's input; backward rebuilds one layer's activations at a time
    layers = n * arch.layers * (d * prec.act if checkpointing else layer)
    recompute = n * layer if checkpointing else 0
    head = n * (3 * d * prec.act + 16)  # final norm, token ids, labels
    return {"layers": layers, "head": head, "recompute": recompute}


def loss_bytes(arch: Arch, cfg: Config, label_rows: int, prec: Precision) -> dict:
    """Bytes the loss holds at its peak for `label_rows` positions that predict a label (model/loss.py)."""
    lora, V, d = cfg.lora, arch.vocab, arch.d
    head_lora = lora is not None and any(x.layer < 0 for x in lora_targets(arch, lora))
    head_saved = lora is not None and "lm_head" in (lora.modules_to_save or [])
    # read from the loss module when called (not copied at import): the plan models the loss that runs
    fused = arch.family in token_loss.FUSED_HEAD_FAMILIES and not (head_lora or head_saved or cfg.train.fsdp)
    if not fused:  # the head at label rows: (N, V) logits, their fp32 copy, the log-softmax kept for backward;
        # backward frees the logits, then holds the log-softmax, its gradient and the logits' gradient
        logit_b = 4 if prec.act == 4 else 2 + 4
        return {"logits": label_rows * V * (logit_b + 4), "loss_backward": label_rows * V * 4}
    # fused: the taken (N, d) head input and its gradient, one chunk of fp32 logits (plus the bf16 matmul
    # output / gradient copy under autocast), and a fp32 (V, d) weight gradient when the head trains
    chunk = min(label_rows, max(1, token_loss.LOSS_CHUNK_VALUES // V))
    head_grad = V * d * (4 + prec.act) if lora is None else 0
    return {"logits": chunk * V * (4 + (2 if prec.act == 2 else 0)) + label_rows * d * prec.weight,
            "loss_backward": label_rows * d * prec.weight + head_grad}


def training_memory(arch: Arch, cfg: Config, rows: int, seq_len: int, prec: Precision, label_fraction: float = 1.0) -> dict:
    """Bytes by role for one training step, and the peak (the larger of end-of-forward and optimizer step)."""
    lora = cfg.lora
    counts = param_counts(arch, lora)
    quantized = 0
    if lora is not None and lora.quantize == "4bit":  # bnb quantizes every decoder Linear weight, not the head
        quantized = sum(x.fan_in * x.fan_out for x in arch.linears if x.layer >= 0)
    base = counts["total"] - counts["lora"]
    # QLoRA: prepare_model_for_kbit_training upcasts what stays unquantized (embeddings, norms, head) to fp32
    rest_b = 4 if quantized else prec.weight
    weights = int(quantized * NF4_BYTES) + (base - quantized) * rest_b
    train_b = 4 if lora is not None else prec.weight  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
    trainable = counts["trainable"]
    adapters = counts["lora"] * 4
    grads = trainable * train_b
    adam = 2 * trainable * train_b  # exp_avg, exp_avg_sq in the parameter's dtype
    linear_w = sum(x.fan_in * x.fan_out for x in arch.linears)
    casts = linear_w * 2 if prec.autocast_copies else 0  # bf16 copies of fp32 weights, saved for backward
    act = activation_bytes(arch, rows, seq_len, prec, cfg.model.attn_implementation, lora, cfg.train.gradient_checkpointing)
    act.update(loss_bytes(arch, cfg, round(rows * seq_len * label_fraction), prec))
    accum_grads = grads if cfg.train.grad_accum > 1 else 0  # grads of earlier micro-batches stay alive
    # three candidate peaks: loss backward starts (all activations + logits), the last recomputed layer
    # (all grads + the checkpointed layer inputs, the head's + one layer), the optimizer step (grads + temporaries)
    forward_peak = sum(v for k, v in act.items() if k != "recompute") + casts + accum_grads
    backward_peak = grads + casts + (act["layers"] + act["head"] + act["recompute"] if cfg.train.gradient_checkpointing else 0)
    largest = max([x.fan_in * x.fan_out for x in arch.linears] + [arch.vocab * arch.d]) if lora is None else 0
    step_peak = grads + (0 if prec.fused_adam else 2 * largest * train_b)  # sqrt(v) and the update of one tensor
    static = weights + adapters + adam
    return {"weights": weights, "lora_adapters": adapters, "gradients": grads, "optimizer": adam,
            "master_weights": 0, "autocast_weight_copies": casts, **{f"activations_{k}": v for k, v in act.items()},
            "static": static, "peak": static + max(forward_peak, backward_peak, step_peak)}


def inference_memory(arch: Arch, batch: int, context: int, weight_bytes: int = 2, quantized: bool = False) -> dict:
    """Weights + KV cache (K and V, every layer, batch x context) + one layer's prefill transients."""
    n = batch * context
    linear_w = sum(x.fan_in * x.fan_out for x in arch.linears if x.layer >= 0)
    total = param_counts(arch)["total"]
    weights = int(linear_w * NF4_BYTES) + (total - linear_w) * weight_bytes if quantized else total * weight_bytes
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * n * weight_bytes
    prefill = n * (4 * arch.d + 2 * arch.ff) * weight_bytes + batch * arch.vocab * 4  # last-token logits only
    return {"weights": weights, "kv_cache": kv, "prefill": prefill, "total": weights + kv + prefill}


def max_micro_batch(arch: Arch, cfg: Config, seq_len: int, prec: Precision, capacity: float,
                    label_fraction: float = 1.0) -> int:
    """Largest rows per micro-batch whose peak fits in `capacity` bytes (0: not even one)."""
    def peak(rows: int) -> int:
        return training_memory(arch, cfg, rows, seq_len, prec, label_fraction)["peak"]

    lo, hi = 0, 1
    while hi <= 4096 and peak(hi) <= capacity:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # peak grows monotonically with rows
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= capacity else (lo, mid)
    return lo


def host_ram_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_table(arch: Arch, cfg: Config, seq_len: int, label_fraction: float = 1.0) -> list[dict]:
    """Fits or not, and the largest micro-batch, on this machine's RAM (CPU) and each GPU in DEVICES."""
    import torch

    from tunesmith.runtime import fast_bf16

    rows, cpu_bf16 = [], fast_bf16(torch.device("cpu"))
    for name, gib, cuda in [("this machine (cpu)", host_ram_bytes() / GiB, False), *((n, g, True) for n, (g, _) in DEVICES.items())]:
        prec = precision_for(cfg, cuda=cuda, bf16=name != "t4-16gb" if cuda else cpu_bf16)
        usable = gib * GiB * (USABLE if cuda else 0.8)  # leave the OS and other processes their share on a host
        need = training_memory(arch, cfg, cfg.train.batch_size, seq_len, prec, label_fraction)["peak"]
        rows.append({"device": name, "capacity_bytes": int(gib * GiB), "needed_bytes": need, "fits": need <= usable,
                     "max_micro_batch": max_micro_batch(arch, cfg, seq_len, prec, usable, label_fraction)})
    return rows


def calibrated_peak_flops(dev, bf16: bool = False) -> float:
    """Peak matmul FLOP/s of `dev` as plans and MFU use it: datasheet, or a timing measured once per machine.

    On CPU: an fp32 Linear, under bf16 autocast when `bf16` (runtime.measure_peak_flops).
    """
    from tunesmith.runtime import measure_peak_flops

    return measure_peak_flops(dev, bf16, cache_root(None) / "peak_flops.json")


def _target(cfg: Config) -> dict:
    """The device planned for: a named GPU from DEVICES, or the device this process would train on."""
    import torch

    from tunesmith.runtime import device, fast_bf16

    name = cfg.plan.device
    if name is not None:
        if name not in DEVICES:
            raise UserError(f"plan.device: unknown device '{name}' (known: {', '.join(DEVICES)})")
        gib, peak = DEVICES[name]
        bf16 = name != "t4-16gb"
        return {"name": name, "cuda": True, "bf16": bf16, "capacity": gib * GiB, "usable": gib * GiB * USABLE,
                "peak_flops": peak, "autocast": _autocast_name(cfg.train.precision, bf16)}
    dev = device()
    native = fast_bf16(dev)  # CUDA: bf16 support; CPU: AVX512-BF16/AMX
    autocast = _autocast_name(cfg.train.precision, native)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_properties(dev).total_memory
        return {"name": torch.cuda.get_device_name(dev), "cuda": True, "bf16": native, "capacity": cap,
                "usable": cap * USABLE, "peak_flops": calibrated_peak_flops(dev), "autocast": autocast}
    ram = host_ram_bytes()
    # the operation the run's matmuls really are: an fp32 Linear, under bf16 autocast when the run uses it
    peak = calibrated_peak_flops(dev, bf16=autocast == "bf16")
    return {"name": "cpu", "cuda": False, "bf16": native, "capacity": ram, "usable": ram * 0.8, "peak_flops": peak,
            "autocast": autocast}


def _autocast_name(precision: str, native_bf16: bool) -> str:
    """The autocast a run of train.precision uses where bf16 is (or is not) native: bf16, fp16 or fp32 (none)."""
    import torch

    from tunesmith.runtime import autocast_dtype

    dtype = autocast_dtype(precision, torch.device("cpu"), native_bf16)  # `native_bf16` decides, not the device
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def what_can_i_run(cfg: Config, target: dict, seq_len: int = 1024) -> list[dict]:
    """For each size in LADDER: bytes for inference, LoRA, QLoRA, full fine-tuning (1 row, checkpointing, all labels)."""
    from tunesmith.config import TrainConfig

    train = TrainConfig(batch_size=1, gradient_checkpointing=True, precision=cfg.train.precision)
    modes = {"lora": LoraConfig(), "qlora": LoraConfig(quantize="4bit"), "full": None}
    prec = precision_for(cfg, target["cuda"], target["bf16"])
    out = []
    for name, shape in LADDER.items():
        arch = arch_from_config(shape)
        row = {"model": name, "params": param_counts(arch)["total"],
               "inference": inference_memory(arch, 1, seq_len, prec.weight)["total"]}
        for mode, lora in modes.items():
            if mode == "qlora" and not target["cuda"]:
                row[mode] = None  # bitsandbytes 4-bit is CUDA only
                continue
            c = cfg.model_copy(update={"train": train, "lora": lora})
            row[mode] = training_memory(arch, c, 1, seq_len, prec)["peak"]
        row["fits"] = {k: (row[k] is not None and row[k] <= target["usable"]) for k in ("inference", *modes)}
        out.append(row)
    return out


def make_plan(cfg: Config, tokens_per_step: int | None = None, total_tokens: int | None = None,
              label_fraction: float = 1.0) -> dict:
    """Parameters, FLOPs, memory, fit and time for `cfg`, from the model config alone (JSON-serialisable).

    `label_fraction`: share of tokens whose position predicts a label (1.0, every token, when the data is unknown).
    """
    arch = arch_from_config(load_config_only(cfg.model))
    seq, rows, ckpt = cfg.data.max_length, cfg.train.batch_size, cfg.train.gradient_checkpointing
    target = _target(cfg)
    prec = precision_for(cfg, target["cuda"], target["bf16"])
    tokens_per_step = tokens_per_step or rows * seq * cfg.train.grad_accum  # packed rows are ~full
    steps = cfg.train.max_steps
    if steps is None and total_tokens is not None:
        steps = max(1, -(-int(total_tokens * cfg.train.epochs) // tokens_per_step))
    flops = flops_per_token(arch, seq, cfg.lora or False, ckpt, label_fraction)
    flops_formula = flops.pop("formula")
    tokens_per_s = target["peak_flops"] * cfg.plan.expected_mfu / flops["model"]
    step_s = tokens_per_step / tokens_per_s
    memory = training_memory(arch, cfg, rows, seq, prec, label_fraction)
    return {
        "model": {"name": cfg.model.name, "model_type": arch.family, "hidden": arch.d, "layers": arch.layers,
                  "heads": arch.heads, "kv_heads": arch.kv_heads, "vocab": arch.vocab, **param_counts(arch, cfg.lora)},
        "run": {"micro_batch": rows, "seq_len": seq, "grad_accum": cfg.train.grad_accum, "tokens_per_step": tokens_per_step,
                "steps": steps, "lora": cfg.lora is not None, "quantize": cfg.lora.quantize if cfg.lora else None,
                "gradient_checkpointing": ckpt, "weight_bytes": prec.weight, "activation_bytes": prec.act,
                "label_fraction": label_fraction},
        "flops": {**flops, "per_step": flops["hardware"] * tokens_per_step,
                  "total": flops["hardware"] * tokens_per_step * steps if steps else None},
        "memory": {**memory, "device": target["name"], "usable_bytes": int(target["usable"]),
                   "fits": memory["peak"] <= target["usable"],
                   "max_micro_batch": max_micro_batch(arch, cfg, seq, prec, target["usable"], label_fraction)},
        "inference": inference_memory(arch, cfg.generate.batch_size, seq + cfg.generate.max_new_tokens, prec.weight),
        "fit": fit_table(arch, cfg, seq, label_fraction),
        "time": {"device": target["name"], "autocast": target["autocast"], "peak_flops": target["peak_flops"],
                 "expected_mfu": cfg.plan.expected_mfu, "tokens_per_s": tokens_per_s, "step_s": step_s, "total_s": step_s * steps if steps else None},
        "what_can_i_run": what_can_i_run(cfg, target),
        "formulas": {"flops": flops_formula, "memory": "peak = weights + adapters + AdamW moments + max(activations + loss (label rows; fused heads: one chunk of logits) [+ grads when grad_accum > 1], grads + optimizer temporaries)"},
        "measured": None,
    }
