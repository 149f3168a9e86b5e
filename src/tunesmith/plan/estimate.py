"""`tunesmith plan`: parameters, FLOPs, memory and time of a fine-tune, from the model config alone.

The formulas and their conventions are in arch.py (parameters, FLOPs) and memory.py (bytes); devices.py says
what the plan is for (capacity, peak FLOP/s, autocast).
"""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.model.load import load_config_only
from tunesmith.plan.arch import arch_from_config, flops_per_token, param_counts
from tunesmith.plan.devices import target_device
from tunesmith.plan.history import plan_mfu
from tunesmith.plan.memory import (
    fit_table,
    host_memory,
    inference_memory,
    max_micro_batch,
    precision_for,
    training_memory,
    what_can_i_run,
)


def make_plan(
    cfg: Config,
    tokens_per_step: int | None = None,
    total_tokens: int | None = None,
    label_fraction: float = 1.0,
    samples_per_step: float | None = None,
) -> dict:
    """Parameters, FLOPs, memory, fit and time for `cfg`, from the model config alone (JSON-serialisable).

    `label_fraction`: share of tokens whose position predicts a label (1.0, every token, when the data is
    unknown). `samples_per_step`: training samples in one optimizer step (packed rows hold several; unknown
    without the data: None).
    """
    arch = arch_from_config(load_config_only(cfg.model))
    seq, rows, ckpt = cfg.data.max_length, cfg.train.batch_size, cfg.train.gradient_checkpointing
    target = target_device(cfg)
    prec = precision_for(cfg, target["cuda"], target["bf16"])
    tokens_per_step = tokens_per_step or rows * seq * cfg.train.grad_accum  # packed rows are ~full
    steps = cfg.train.max_steps
    if steps is None and total_tokens is not None:
        steps = max(1, -(-int(total_tokens * cfg.train.epochs) // tokens_per_step))
    flops = flops_per_token(arch, seq, cfg.lora or False, ckpt, label_fraction)
    flops_formula = flops.pop("formula")
    counts = param_counts(arch, cfg.lora)
    expected_mfu, mfu_source = plan_mfu(cfg, target, arch.family, counts["total"])
    tokens_per_s = target["peak_flops"] * expected_mfu / flops["model"]
    step_s = tokens_per_step / tokens_per_s
    memory = training_memory(arch, cfg, rows, seq, prec, label_fraction)
    if not target["cuda"]:  # a CPU run is measured as resident memory (RSS), not allocated tensors
        memory.update(host_memory(memory))
    return {
        "model": {
            "name": cfg.model.name,
            "model_type": arch.family,
            "hidden": arch.d,
            "layers": arch.layers,
            "heads": arch.heads,
            "kv_heads": arch.kv_heads,
            "vocab": arch.vocab,
            **counts,
        },
        "run": {
            "micro_batch": rows,
            "seq_len": seq,
            "grad_accum": cfg.train.grad_accum,
            "tokens_per_step": tokens_per_step,
            # train.batch_size counts rows: with data.packing a row of max_length tokens holds several samples
            "packing": cfg.data.packing,
            "rows_per_step": rows * cfg.train.grad_accum,
            "samples_per_step": samples_per_step,
            "steps": steps,
            "lora": cfg.lora is not None,
            "quantize": cfg.lora.quantize if cfg.lora else None,
            "gradient_checkpointing": ckpt,
            "weight_bytes": prec.weight,
            "activation_bytes": prec.act,
            "label_fraction": label_fraction,
        },
        "flops": {
            **flops,
            "per_step": flops["hardware"] * tokens_per_step,
            "total": flops["hardware"] * tokens_per_step * steps if steps else None,
        },
        "memory": {
            **memory,
            "device": target["name"],
            "usable_bytes": int(target["usable"]),
            "fits": memory.get("resident_peak", memory["peak"]) <= target["usable"],
            "max_micro_batch": max_micro_batch(arch, cfg, seq, prec, target["usable"], label_fraction),
        },
        "inference": inference_memory(
            arch, cfg.generate.batch_size, seq + cfg.generate.max_new_tokens, prec.weight
        ),
        "fit": fit_table(arch, cfg, seq, label_fraction),
        "time": {
            "device": target["name"],
            "autocast": target["autocast"],
            "peak_flops": target["peak_flops"],
            "peak_source": target.get("peak_source", "measured"),
            "expected_mfu": expected_mfu,
            "mfu_source": mfu_source,
            "tokens_per_s": tokens_per_s,
            "step_s": step_s,
            "total_s": step_s * steps if steps else None,
        },
        "what_can_i_run": what_can_i_run(cfg, target),
        "formulas": {
            "flops": flops_formula,
            "memory": (
                "peak = weights + adapters + AdamW moments + max(activations + loss "
                "(label rows; fused heads: one chunk of logits) [+ grads when grad_accum > 1], "
                "grads + optimizer temporaries); on CPU resident_peak = peak + allocator_retained "
                "(memory.HOST_RETAINED x one step's activations: freed, kept resident by malloc)"
            ),
        },
        "measured": None,
    }
