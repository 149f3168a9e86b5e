"""Check the planner on a GPU: predicted vs measured peak memory, step time and MFU for a ~0.5B model.

    python bench/plan_gpu.py                 # CUDA: Qwen2-0.5B shape, random init, bf16, full + LoRA
    python bench/plan_gpu.py --smoke         # anywhere: tiny shape on CPU, 3 steps (checks the script runs)

No downloads: the model is built from its config. Memory is `torch.cuda.max_memory_allocated` over the
timed steps (tensor bytes, the quantity the planner predicts); step time is the median of the timed steps
after warm-up; MFU = model FLOPs/token (plan.flops_per_token) x tokens/s / device peak
(plan.calibrated_peak_flops).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM

from tunesmith.config import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig
from tunesmith.data.render import IGNORE
from tunesmith.model.lora import apply_lora
from tunesmith.model.loss import loss_sum
from tunesmith.plan.arch import arch_from_config, flops_per_token
from tunesmith.plan.devices import calibrated_peak_flops
from tunesmith.plan.memory import LADDER, precision_for, training_memory

TINY = dict(
    model_type="qwen2",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    tie_word_embeddings=True,
)


def run_mode(shape: dict, cfg: Config, dev: torch.device, steps: int, warmup: int) -> dict:
    """Train `steps` steps on random tokens as our loop does (autocast, our loss, AdamW); measure."""
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    prec = precision_for(cfg, dev.type == "cuda", bf16)
    hf_cfg = AutoConfig.for_model(**shape)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if prec.weight == 2 else torch.float32
    model = AutoModelForCausalLM.from_config(
        hf_cfg, dtype=dtype, attn_implementation=cfg.model.attn_implementation
    ).to(dev)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
    rows, seq, vocab = cfg.train.batch_size, cfg.data.max_length, hf_cfg.vocab_size
    ids = torch.randint(0, vocab, (rows, seq), device=dev)
    labels = ids.masked_fill(
        torch.arange(seq, device=dev) < seq // 2, IGNORE
    )  # first half a prompt: no loss there
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    label_fraction = (labels[:, 1:] != IGNORE).sum().item() / ids.numel()
    amp = (
        torch.autocast(dev.type, dtype=torch.bfloat16)
        if prec.act == 2 and prec.weight == 4
        else torch.autocast(dev.type, enabled=False)
    )
    times = []
    for step in range(steps):
        if step == warmup and dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with amp:
            total, count = loss_sum(model, batch)  # LM head at label positions only, fused where it can be
        loss = total / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        del total, loss
    arch = arch_from_config(hf_cfg)
    predicted = training_memory(arch, cfg, rows, seq, prec, label_fraction)
    flops = flops_per_token(arch, seq, cfg.lora or False, cfg.train.gradient_checkpointing, label_fraction)
    step_s = statistics.median(times)
    tokens_per_s = rows * seq / step_s
    return {
        "predicted_peak": predicted["peak"],
        "measured_peak": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "static": predicted["static"],
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops["model"],
        "mfu": flops["model"] * tokens_per_s / calibrated_peak_flops(dev),
    }


def main() -> None:
    """Full fine-tune and LoRA (with and without checkpointing) on the Qwen2-0.5B shape; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--expected-mfu", type=float, default=0.35)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = TINY if args.smoke else LADDER["qwen2.5-0.5b"]
    batch, seq, steps = (2, 64, 3) if args.smoke else (args.batch, args.seq, args.steps)
    modes = {
        "full": (None, False),
        "full+ckpt": (None, True),
        "lora r16": (LoraConfig(r=16, dropout=0.05), False),
        "lora r16+ckpt": (LoraConfig(r=16, dropout=0.05), True),
    }
    shape = "tiny qwen2 (smoke, cpu)" if args.smoke else "Qwen2-0.5B shape"
    table = Table(title=f"plan vs measured: {shape} on {dev}, {batch} x {seq}")
    for col in (
        "mode",
        "pred peak GiB",
        "meas peak GiB",
        "meas/pred",
        "step s",
        "tokens/s",
        "MFU",
        "pred step s @ exp. MFU",
    ):
        table.add_column(col, justify="right")
    peak = calibrated_peak_flops(dev)
    for name, (lora, ckpt) in modes.items():
        cfg = Config(
            model=ModelConfig(attn_implementation="sdpa"),
            data=DataConfig(max_length=seq),
            train=TrainConfig(batch_size=batch, gradient_checkpointing=ckpt),
            lora=lora,
        )
        r = run_mode(shape, cfg, dev, steps, warmup=1 if args.smoke else 3)
        meas = r["measured_peak"]
        pred_step = batch * seq * r["model_flops_per_token"] / (peak * args.expected_mfu)
        table.add_row(
            name,
            f"{r['predicted_peak'] / 2**30:.3f}",
            "-" if meas is None else f"{meas / 2**30:.3f}",
            "-" if meas is None else f"{meas / r['predicted_peak']:.3f}",
            f"{r['step_s']:.4f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['mfu']:.1%}",
            f"{pred_step:.4f}",
        )
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    Console().print(table)
    Console().print(f"device peak used for MFU: {peak / 1e12:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
