"""Bytes of a fine-tune by role (weights, adapters, grads, AdamW, activations, loss), of inference; what fits.

Conventions (also in every plan.json under "formulas"): tensor bytes (what torch.cuda.max_memory_allocated
counts), not allocator fragmentation or the CUDA context; a device is usable up to devices.USABLE of its
capacity. Logits exist at label positions only, and for a plain head (model/loss.py's FUSED_HEAD_FAMILIES) one
chunk of its LOSS_CHUNK_VALUES at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import Config, LoraConfig
from tunesmith.model import loss as token_loss
from tunesmith.plan.arch import Arch, arch_from_config, lora_targets, param_counts
from tunesmith.plan.devices import DEVICES, NO_BF16, USABLE, GiB, host_ram_bytes

NF4_BYTES = (
    4 + 8 / 64 + 32 / (64 * 256)
) / 8  # 4-bit value + 8-bit absmax per 64 + fp32 per 256 blocks (double quant)
# the "what can I run" ladder: public shapes, no weights needed
LADDER = {
    "pythia-70m": dict(
        model_type="gpt_neox",
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        vocab_size=50304,
        rotary_pct=0.25,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        model_type="llama",
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    ),
    "llama-2-13b": dict(
        model_type="llama",
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
    ),
    "qwen2.5-32b": dict(
        model_type="qwen2",
        hidden_size=5120,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=27648,
        vocab_size=152064,
    ),
    "llama-3.1-70b": dict(
        model_type="llama",
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
    ),
}
# CPU: glibc's malloc keeps what a step freed in heaps that stay resident, fragmented, and later steps
# allocate beside it: a training process's resident peak exceeds its tensor peak by a share of one step's
# activations (activations_*). The share depends on the process's history (the dynamic mmap threshold its
# earlier large frees raised). Measured as VmHWM above the RSS before the model; fp32, LoRA r32 all-linear,
# 8 x 160 tokens, 2-core EPYC: `tunesmith train` of the quickstart 2.73 GiB vs 2.34 tensors, 1.73 of them
# activations (0.22); a bare loop in a fresh process 4.66 vs 2.41 (1.25); with MALLOC_MMAP_THRESHOLD_=131072
# (threshold fixed) a 6-layer model of that shape 0.685 vs 0.64 (0.1): pinning it would make this small.
HOST_RETAINED = 0.25
# Linears of one decoder layer that read the same tensor (one saved input between them)
_SHARED_INPUT = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
}


@dataclass(frozen=True)
class Precision:
    """Bytes per element as our loop runs: params in model.dtype, autocast per train.precision."""

    weight: int  # parameter (and grad, AdamW moment) bytes
    act: int  # activation bytes
    autocast_copies: bool  # fp32 params under bf16/fp16 autocast: the cast weight copies live until backward
    # fused AdamW (CUDA and CPU): no temporaries; else the per-tensor loop's temporaries of one tensor
    fused_adam: bool


def precision_for(cfg: Config, cuda: bool, bf16: bool) -> Precision:
    """What model.dtype/train.precision mean on a CUDA device or a CPU; `bf16`: bf16 matmuls are native."""
    weight = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2 if (cuda and bf16) else 4}[cfg.model.dtype]
    # as runtime.autocast_dtype
    auto = {"fp32": None, "bf16": 2, "fp16": 2, "auto": 2 if bf16 else None}[cfg.train.precision]
    act = auto or weight
    # make_optimizer: fused on CUDA and CPU
    return Precision(weight, act, weight == 4 and auto is not None, True)


def activation_bytes(
    arch: Arch,
    rows: int,
    seq_len: int,
    prec: Precision,
    attn: str = "sdpa",
    lora: LoraConfig | None = None,
    checkpointing: bool = False,
) -> dict:
    """Saved-for-backward bytes of the decoder, (rows, seq_len) micro-batch: layers, head input, recompute."""
    n, d, ff, H = rows * seq_len, arch.d, arch.ff, arch.heads
    dq, dkv = H * arch.head_dim, arch.kv_heads * arch.head_dim
    # per token per layer, counted with saved-tensor hooks on fp32 models (see tests/test_plan.py):
    # Llama-like: x, 2 norm outputs x2, q/attn-out/o-in (3 dq), k, v (2 dkv), gate, up, act, act*up (4 ff),
    #   lse (H)
    # GPT-NeoX: x, 2 LN outputs, fused qkv (3 dq), rotated q, k, attn out x2 (10 d in all), fc1 out,
    #   gelu out (2 ff)
    per = (
        (10 * d + 2 * ff + H + 4)
        if arch.family == "gpt_neox"
        else (5 * d + 3 * dq + 2 * dkv + 4 * ff + H + 2)
    )
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
            inputs = {
                (x.layer, _SHARED_INPUT.get(x.name.rsplit(".", 1)[-1], x.name)): x.fan_in for x in targets
            }
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
    if (
        not fused
    ):  # the head at label rows: (N, V) logits, their fp32 copy, the log-softmax kept for backward;
        # backward frees the logits, then holds the log-softmax, its gradient and the logits' gradient
        logit_b = 4 if prec.act == 4 else 2 + 4
        return {"logits": label_rows * V * (logit_b + 4), "loss_backward": label_rows * V * 4}
    # fused: the taken (N, d) head input and its gradient, one chunk of fp32 logits (plus the bf16 matmul
    # output / gradient copy under autocast), and a fp32 (V, d) weight gradient when the head trains
    chunk = min(label_rows, max(1, token_loss.LOSS_CHUNK_VALUES // V))
    head_grad = V * d * (4 + prec.act) if lora is None else 0
    return {
        "logits": chunk * V * (4 + (2 if prec.act == 2 else 0)) + label_rows * d * prec.weight,
        "loss_backward": label_rows * d * prec.weight + head_grad,
    }


def training_memory(
    arch: Arch, cfg: Config, rows: int, seq_len: int, prec: Precision, label_fraction: float = 1.0
) -> dict:
    """Bytes by role for one training step, and the peak (the larger of end-of-forward and optimizer step)."""
    lora = cfg.lora
    counts = param_counts(arch, lora)
    quantized = 0
    if (
        lora is not None and lora.quantize == "4bit"
    ):  # bnb quantizes every decoder Linear weight, not the head
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
    act = activation_bytes(
        arch, rows, seq_len, prec, cfg.model.attn_implementation, lora, cfg.train.gradient_checkpointing
    )
    act.update(loss_bytes(arch, cfg, round(rows * seq_len * label_fraction), prec))
    accum_grads = grads if cfg.train.grad_accum > 1 else 0  # grads of earlier micro-batches stay alive
    # three candidate peaks: loss backward starts (all activations + logits), the last recomputed layer
    # (all grads + the checkpointed layer inputs, the head's + one layer), the optimizer step
    # (grads + temporaries)
    forward_peak = sum(v for k, v in act.items() if k != "recompute") + casts + accum_grads
    backward_peak = (
        grads
        + casts
        + (act["layers"] + act["head"] + act["recompute"] if cfg.train.gradient_checkpointing else 0)
    )
    largest = max([x.fan_in * x.fan_out for x in arch.linears] + [arch.vocab * arch.d]) if lora is None else 0
    # unfused: sqrt(v) and the update of one tensor
    step_peak = grads + (0 if prec.fused_adam else 2 * largest * train_b)
    static = weights + adapters + adam
    return {
        "weights": weights,
        "lora_adapters": adapters,
        "gradients": grads,
        "optimizer": adam,
        "master_weights": 0,
        "autocast_weight_copies": casts,
        **{f"activations_{k}": v for k, v in act.items()},
        "static": static,
        "peak": static + max(forward_peak, backward_peak, step_peak),
    }


def host_memory(mem: dict) -> dict:
    """CPU: the resident bytes a training process adds beyond `training_memory`'s tensors, and its peak RSS.

    What the planner compares with a CPU run's measured peak (VmHWM above the RSS before the model loaded).
    """
    transient = sum(v for k, v in mem.items() if k.startswith("activations_"))
    retained = int(transient * HOST_RETAINED)
    return {
        "allocator_retained": retained,
        "resident_peak": mem["peak"] + retained,
    }


def inference_memory(
    arch: Arch, batch: int, context: int, weight_bytes: int = 2, quantized: bool = False
) -> dict:
    """Weights + KV cache (K and V, every layer, batch x context) + one layer's prefill transients."""
    n = batch * context
    linear_w = sum(x.fan_in * x.fan_out for x in arch.linears if x.layer >= 0)
    total = param_counts(arch)["total"]
    weights = (
        int(linear_w * NF4_BYTES) + (total - linear_w) * weight_bytes if quantized else total * weight_bytes
    )
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * n * weight_bytes
    prefill = n * (4 * arch.d + 2 * arch.ff) * weight_bytes + batch * arch.vocab * 4  # last-token logits only
    return {"weights": weights, "kv_cache": kv, "prefill": prefill, "total": weights + kv + prefill}


def max_micro_batch(
    arch: Arch, cfg: Config, seq_len: int, prec: Precision, capacity: float, label_fraction: float = 1.0
) -> int:
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


def fit_table(arch: Arch, cfg: Config, seq_len: int, label_fraction: float = 1.0) -> list[dict]:
    """Fits or not, and the largest micro-batch, on this machine's RAM (CPU) and each GPU in DEVICES."""
    import torch

    from tunesmith.runtime import fast_bf16

    rows, cpu_bf16 = [], fast_bf16(torch.device("cpu"))
    for name, gib, cuda in [
        ("this machine (cpu)", host_ram_bytes() / GiB, False),
        *((n, g, True) for n, (g, _) in DEVICES.items()),
    ]:
        prec = precision_for(cfg, cuda=cuda, bf16=name not in NO_BF16 if cuda else cpu_bf16)
        # leave the OS and other processes their share on a host
        usable = gib * GiB * (USABLE if cuda else 0.8)
        need = training_memory(arch, cfg, cfg.train.batch_size, seq_len, prec, label_fraction)["peak"]
        rows.append(
            {
                "device": name,
                "capacity_bytes": int(gib * GiB),
                "needed_bytes": need,
                "fits": need <= usable,
                "max_micro_batch": max_micro_batch(arch, cfg, seq_len, prec, usable, label_fraction),
            }
        )
    return rows


def what_can_i_run(cfg: Config, target: dict, seq_len: int = 1024) -> list[dict]:
    """For each size in LADDER: bytes for inference, LoRA, QLoRA, full fine-tuning.

    Training rows assume 1 row, checkpointing and all tokens labelled.
    """
    from tunesmith.config import TrainConfig

    train = TrainConfig(batch_size=1, gradient_checkpointing=True, precision=cfg.train.precision)
    modes = {"lora": LoraConfig(), "qlora": LoraConfig(quantize="4bit"), "full": None}
    prec = precision_for(cfg, target["cuda"], target["bf16"])
    out = []
    for name, shape in LADDER.items():
        arch = arch_from_config(shape)
        row = {
            "model": name,
            "params": param_counts(arch)["total"],
            "inference": inference_memory(arch, 1, seq_len, prec.weight)["total"],
        }
        for mode, lora in modes.items():
            if mode == "qlora" and not target["cuda"]:
                row[mode] = None  # bitsandbytes 4-bit is CUDA only
                continue
            c = cfg.model_copy(update={"train": train, "lora": lora})
            row[mode] = training_memory(arch, c, 1, seq_len, prec)["peak"]
        row["fits"] = {k: (row[k] is not None and row[k] <= target["usable"]) for k in ("inference", *modes)}
        out.append(row)
    return out
