"""Bench: tunesmith batched generation (batch 8 and 32) vs a one-prompt-at-a-time HF `generate` loop.

Same model, same prompts, greedy, same max_new_tokens; tokens/s counts the answer tokens each side produced.
    HF_HUB_OFFLINE=1 .venv/bin/python bench/generate.py [--model smollm2-135m-instruct] [--n 32] [--new 32]
Falls back to a ~20M-parameter GPT-NeoX built from config (with the tiny test tokenizer) when the
packaged model cannot be resolved.
"""

from __future__ import annotations

import argparse
import time

import torch

from tunesmith.config import GenerateConfig, ModelConfig
from tunesmith.generate import generate
from tunesmith.model.load import pad_id

QUESTIONS = [
    "What is fine-tuning?",
    "Name three colors.",
    "How do plants make food from sunlight?",
    "Explain what a database index is and why it makes queries faster.",
    "What is 12 times 7?",
    "Write one sentence about the sea.",
    "Why is the sky blue?",
    "What does a CPU do in a computer, briefly?",
]


def load(name: str, device: torch.device):
    """(model, tokenizer, label): `name` via tunesmith's loader; empty or unloadable: GPT-NeoX from config."""
    if name:
        from tunesmith.config import UserError
        from tunesmith.model.load import load_model, load_tokenizer

        cfg = ModelConfig(name=name, dtype="float32" if device.type == "cpu" else "bfloat16")
        try:
            return load_model(cfg, device).eval(), load_tokenizer(cfg), name
        except (UserError, OSError, ImportError) as e:
            print(f"could not load {name} ({type(e).__name__}: {e}); using a GPT-NeoX from config")
    import sys
    from pathlib import Path

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests/tiny.py
    from tests import tiny

    tok = tiny.tokenizer()
    torch.manual_seed(0)
    conf = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=384,
        num_hidden_layers=8,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=1024,
    )
    model = GPTNeoXForCausalLM(conf).to(device).eval()
    return model, tok, f"gpt-neox-from-config ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M)"


def prompts_for(tok, n: int) -> list[list[int]]:
    """n chat prompts of varied length (the chat template when the tokenizer has one)."""
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + (" Answer briefly." * (i % 3))
        if tok.chat_template:
            text = tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            out.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            out.append(tok(q)["input_ids"])
    return out


def hf_one_by_one(model, tok, prompts: list[list[int]], new: int) -> tuple[int, float]:
    """The baseline: one unpadded prompt per `model.generate` call."""
    eos = tok.eos_token_id
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=pad_id(tok),
                eos_token_id=eos,
            )
            gen = out[0, len(p) :].tolist()
            tokens += gen.index(eos) if eos in gen else len(gen)
    return tokens, time.perf_counter() - t0


def ours(model, tok, prompts: list[list[int]], new: int, batch: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, GenerateConfig(max_new_tokens=new, batch_size=batch))
    return sum(len(c.ids) for c in out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="'' = a GPT-NeoX from config")
    ap.add_argument("--n", type=int, default=32, help="prompts")
    ap.add_argument("--new", type=int, default=32, help="max new tokens")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, label = load(args.model, device)
    prompts = prompts_for(tok, args.n)
    print(
        f"model: {label} on {device} ({torch.get_num_threads()} threads); {len(prompts)} prompts, "
        f"{min(map(len, prompts))}-{max(map(len, prompts))} prompt tokens, max_new_tokens={args.new}"
    )
    ours(model, tok, prompts[:2], 2, 2)  # warm-up (allocator, kernels)
    n, s = hf_one_by_one(model, tok, prompts, args.new)
    base = n / s
    print(f"{'HF generate, one prompt at a time':36s} {n:5d} tokens {s:7.2f} s {base:8.1f} tokens/s   1.00x")
    for b in args.batches:
        n, s = ours(model, tok, prompts, args.new, b)
        name = f"tunesmith generate, batch {b}"
        print(f"{name:36s} {n:5d} tokens {s:7.2f} s {n / s:8.1f} tokens/s {n / s / base:6.2f}x")


if __name__ == "__main__":
    main()
