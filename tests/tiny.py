"""Tiny real components for tests: a byte-level BPE tokenizer trained here, GPT-NeoX and Llama from config."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tunesmith.config import Config, load_config

CORPUS = [
    "What was the revenue of Acme in Q3 2020? The revenue of Acme in Q3 2020 was $34 million.",
    "How many employees does the company have? The company has 1,200 employees.",
    "### Question:\n### Answer:\nBelow is an instruction that describes a task.",
    "The quick brown fox jumps over the lazy dog. Fine-tuning turns a general model into a specialist.",
    "user assistant system hello world the answer is 42 percent growth margin EBITDA",
]
# ChatML, as SmolLM2/Qwen use; <eos> ends an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok.to_str()


def tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A fast byte-level BPE tokenizer (vocab 400): <eos>, <pad> (unless pad=False) and a chat template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<eos>")
    if pad:
        tok.pad_token = "<pad>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def gpt_neox(vocab: int = 400, seed: int = 0, **over) -> GPTNeoXForCausalLM:
    """GPT-NeoX (pythia's class): hidden 32, 2 layers, 4 heads."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        rotary_pct=0.25,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    cfg.update(over)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval()


def llama(vocab: int = 400, seed: int = 0, **over) -> LlamaForCausalLM:
    """Llama: hidden 32, 2 layers, 4 heads, 2 KV heads."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    cfg.update(over)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def save_model_dir(path: Path, arch: str = "gpt_neox", seed: int = 0) -> Path:
    """A complete local HF model dir (safetensors + tokenizer) for end-to-end tests."""
    model = (gpt_neox if arch == "gpt_neox" else llama)(seed=seed)
    tok = tokenizer()
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_qa(path: Path, n: int = 40, seed: int = 0) -> Path:
    """A small QA jsonl with numeric answers (hand-readable)."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "question": f"What was the revenue of company {i} in Q{i % 4 + 1}?",
                "answer": f"The revenue of company {i} was ${(i * 7 + seed) % 90 + 10} million.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- a tiny training run: the overrides every end-to-end test starts from


def train_overrides(model_dir: Path, data: Path, out_dir: Path, *over: str) -> list[str]:
    """`key=value` overrides of a tiny run: 4 held-out examples, 64 tokens, batch 4; `over` appended."""
    return [
        f"model.name={model_dir}",
        f"data.path={data}",
        f"out_dir={out_dir}",
        "data.test_size=4",
        "data.max_length=64",
        "train.batch_size=4",
        *over,
    ]


def train_config(tmp_path: Path, model_dir: Path, data: Path, *over: str) -> Config:
    """The in-process config of a tiny run into <tmp_path>/run: lr 3e-3, constant schedule, a row per step."""
    base = ["train.lr=3e-3", "train.log_every=1", "train.scheduler=constant"]
    return load_config(None, train_overrides(model_dir, data, tmp_path / "run", *base, *over))


def train_command(tmp: Path, *over: str) -> list[str]:
    """`python -m tunesmith train` of a tiny run into <tmp>/run: writes <tmp>/model, qa.jsonl and c.yaml."""
    model, data = save_model_dir(tmp / "model"), write_qa(tmp / "qa.jsonl")
    (tmp / "c.yaml").write_text("data: {format: qa}\n")
    overrides = train_overrides(model, data, tmp / "run", *over)
    return [sys.executable, "-m", "tunesmith", "train", str(tmp / "c.yaml"), *overrides]
