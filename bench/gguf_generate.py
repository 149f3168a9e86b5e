"""Bench: greedy generation tokens/s, llama.cpp (`serve.engine: llama.cpp`) vs tunesmith's own `generate`.

One model, SmolLM2-135M-Instruct, three ways: tunesmith's `generate` on the HF dir (the packaged GGUF
converted by the resolver, float32, batch 1 and batched), and llama.cpp through the serving engine
(`serve/llama_cpp.GgufModel`, one request at a time) over an f16 GGUF written by llama.cpp's converter from
that HF dir, and over the packaged Q4_1 GGUF. Same chat prompts, greedy, same max_new_tokens; tokens/s counts
the answer tokens each side produced (EOS ends an answer early on both sides; the counts are printed).
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gguf_generate.py [--n 8] [--new 64] [--batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.config import Config, DataConfig, GenerateConfig, ModelConfig
from tunesmith.generate import generate
from tunesmith.plan.history import cpu_name

SHORT = "smollm2-135m-instruct"
QUESTIONS = [
    "Explain what fine-tuning a language model means.",
    "Describe how plants make food from sunlight.",
    "Explain what a database index is and why it makes queries faster.",
    "Write a short paragraph about the sea.",
    "Why is the sky blue? Explain in detail.",
    "Describe what a CPU does in a computer.",
    "Tell me about the history of Paris.",
    "Explain how a bicycle stays upright.",
]


def tunesmith_side(
    prompts: list[list[int]], new: int, batch: int, model, tok
) -> tuple[list[list[int]], float]:
    """(answer ids per prompt, seconds) of tunesmith's batched `generate`."""
    t0 = time.perf_counter()
    out = generate(model, tok, prompts, GenerateConfig(max_new_tokens=new, batch_size=batch))
    return [c.ids for c in out], time.perf_counter() - t0


def llama_side(gguf, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    """(answer ids per prompt, seconds) of the llama.cpp engine, one request after another."""
    cfg = GenerateConfig(max_new_tokens=new)

    async def run() -> list[list[int]]:
        return [(await gguf.complete(gguf.name, p, cfg)).ids for p in prompts]

    t0 = time.perf_counter()
    out = asyncio.run(run())
    return out, time.perf_counter() - t0


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of answer positions where two greedy runs agree (a row counts until its first difference)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += max(len(x), len(y))
        for i, j in zip(x, y, strict=False):
            if i != j:
                break
            same += 1
    return same / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="prompts")
    ap.add_argument("--new", type=int, default=64, help="max new tokens")
    ap.add_argument("--batch", type=int, default=8, help="tunesmith's batch size (besides 1)")
    args = ap.parse_args()

    from tunesmith.model.gguf import convert_to_gguf
    from tunesmith.model.load import load_model, load_tokenizer
    from tunesmith.model.resolve import packaged_gguf, resolve
    from tunesmith.serve.llama_cpp import load_gguf

    hf_dir = Path(resolve(SHORT))  # the packaged Q4_1 dequantized to an HF dir (cached)
    mcfg = ModelConfig(name=str(hf_dir), dtype="float32")
    model, tok = load_model(mcfg, torch.device("cpu")).eval(), load_tokenizer(mcfg)
    cfg = Config(data=DataConfig(max_length=1024))  # n_ctx of the llama.cpp contexts
    with tempfile.TemporaryDirectory() as tmp:
        f16 = convert_to_gguf(hf_dir, Path(tmp) / "smollm2-135m-instruct-f16.gguf", "f16")
        ggufs = {
            "llama.cpp, f16 GGUF": load_gguf("f16", f16, cfg),
            "llama.cpp, Q4_1 GGUF (packaged)": load_gguf("q4_1", packaged_gguf(SHORT), cfg),
        }
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.n)]
        prompts = [ggufs["llama.cpp, f16 GGUF"].chat_ids([{"role": "user", "content": q}]) for q in questions]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            for q in questions
        ]
        ours = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        print(f"cpu: {cpu_name()}; torch threads {torch.get_num_threads()}, llama.cpp threads = cores")
        print(
            f"model: SmolLM2-135M-Instruct; {len(prompts)} chat prompts ({min(map(len, prompts))}-"
            f"{max(map(len, prompts))} tokens), greedy, max_new_tokens={args.new}; "
            f"GGUF chat template renders the same ids as the HF tokenizer's: {prompts == ours}"
        )
        tunesmith_side(prompts[:2], 2, 2, model, tok)  # warm-up
        for g in ggufs.values():
            llama_side(g, prompts[:1], 2)
        rows, answers, base = [], {}, {}
        for b in dict.fromkeys([1, args.batch]):
            ids, s = tunesmith_side(prompts, args.new, b, model, tok)
            answers[f"tunesmith b{b}"], base[b] = ids, sum(map(len, ids)) / s
            rows.append((f"tunesmith generate, HF fp32, batch {b}", ids, s))
        for name, g in ggufs.items():
            ids, s = llama_side(g, prompts, args.new)
            answers[name] = ids
            rows.append((f"{name}, batch 1", ids, s))
        print(f"{'engine':42s} {'tokens':>6s} {'s':>7s} {'tok/s':>8s}  vs ours b1  vs ours b{args.batch}")
        for name, ids, s in rows:
            n = sum(map(len, ids))
            rate = n / s
            vs = f"{rate / base[1]:10.2f}x {rate / base[args.batch]:10.2f}x"
            print(f"{name:42s} {n:6d} {s:7.2f} {rate:8.1f} {vs}")
        ref = answers["tunesmith b1"]
        for name in ggufs:
            print(f"greedy tokens agreeing with tunesmith b1: {name}: {agreement(answers[name], ref):.1%}")


if __name__ == "__main__":
    main()
