"""Load tokenizers, models (safetensors only; optional 4-bit NF4) and configs.

Also the template that travels with a model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunesmith.config import ModelConfig, UserError
from tunesmith.model.resolve import resolve
from tunesmith.runtime import bf16_supported, weight_dtype

TEMPLATE_FILE = "tunesmith_template.json"
# Special tokens that can stand in as padding, best first. Padding is masked by position in our data layer,
# so any id works; a distinct one keeps pad != eos so nothing downstream can confuse the two.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<unk>", "<|endoftext|>")
# Files that carry a vocabulary (tokenizer_config.json alone does not); *.model (sentencepiece) and
# *.tiktoken also do.
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
_PROBE = "Hello world 123"  # any real vocabulary has tokens (or bytes) for this


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer with a pad token (not EOS when the vocab has a spare special token).

    UserError for a directory without tokenizer files and for a tokenizer that encodes text to nothing:
    transformers 5 builds an empty tokenizer from config.json alone, and every example would train on a lone
    EOS.
    """
    local = Path(cfg.name).expanduser()
    # an adapter dir (no config.json, so not a model to resolve) may carry the tokenizer it was trained with
    path = str(local) if local.is_dir() and has_tokenizer_files(local) else resolve(cfg.name, cfg.cache_dir)
    if Path(path).is_dir() and not has_tokenizer_files(path):
        raise UserError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json: copy the base "
            "model's tokenizer files into this directory)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=cfg.trust_remote_code)
    except ValueError as e:  # e.g. a tokenizer_config.json without the vocabulary it describes
        if "backend tokenizer" not in str(e):
            raise
        raise UserError(
            f"{path}: the tokenizer files do not make a tokenizer "
            "(no tokenizer.json, and no vocabulary to convert; copy tokenizer.json from the base model)"
        ) from None
    if not tok.is_fast:
        raise UserError(
            f"model.name '{cfg.name}': only a slow tokenizer is available "
            "(tunesmith needs a fast one: add tokenizer.json)"
        )
    if not tok(_PROBE, add_special_tokens=False)["input_ids"]:
        raise UserError(
            f"{path}: the tokenizer encodes {_PROBE!r} to no tokens "
            f"(an empty vocabulary of {len(tok)} tokens: "
            "its tokenizer.json is empty or broken; use the base model's tokenizer files)"
        )
    set_pad_token(tok)
    return tok


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether `directory` holds a vocabulary transformers can build a tokenizer from.

    Any of: tokenizer.json, sentencepiece, BPE, WordPiece, tiktoken.
    """
    d = Path(directory)
    return (
        any((d / name).is_file() for name in _VOCAB_FILES)
        or any(d.glob("*.model"))
        or any(d.glob("*.tiktoken"))
    )


def set_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give `tok` a pad token that is not EOS when an existing token can serve; never adds tokens."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    specials = [t for t in (*_PAD_CANDIDATES, tok.unk_token) if t]
    vocab = tok.get_vocab()
    for token in specials:
        if token in vocab and vocab[token] != tok.eos_token_id and vocab[token] != tok.bos_token_id:
            tok.pad_token = token
            return
    # No spare: pad == eos. Safe because labels and attention are built from positions, not from pad ids.
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the pad token, else EOS (padding is masked by position: both safe)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def load_config_only(cfg: ModelConfig) -> PretrainedConfig:
    """The architecture config without weights (a GGUF is read for its metadata, not converted)."""
    path = resolve(cfg.name, cfg.cache_dir, convert=False)
    if path.lower().endswith(".gguf"):
        gguf = Path(path)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)


def load_model(cfg: ModelConfig, device: torch.device, quantize: str | None = None) -> PreTrainedModel:
    """Weights from safetensors onto `device` in model.dtype; quantize='4bit' loads NF4 via bitsandbytes."""
    path = resolve(cfg.name, cfg.cache_dir)
    dtype = weight_dtype(cfg.dtype, device)
    extra = {}
    if quantize == "4bit":
        extra = _four_bit(device)
    elif quantize is not None:
        raise UserError(f"lora.quantize: unknown value '{quantize}' (use 4bit or leave it unset)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            **extra,
        )
    except OSError as e:
        if "safetensors" in str(e).lower() or ".bin" in str(e):
            raise UserError(
                f"model.name '{cfg.name}': no .safetensors weights "
                "(tunesmith never unpickles .bin files; convert the weights to safetensors)"
            ) from None
        raise
    if quantize is None:
        model.to(device)
    # remembered so an adapter saved later names the base as the user gave it, not a cache path
    model.tunesmith_model_config = cfg
    return model


def _four_bit(device: torch.device) -> dict:
    """from_pretrained arguments for NF4 with double quantization; UserError without CUDA or bitsandbytes."""
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "lora.quantize=4bit needs CUDA and bitsandbytes "
            "(pip install bitsandbytes on a CUDA machine, or remove lora.quantize)"
        )
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if bf16_supported(device) else torch.float16
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    return {"quantization_config": bnb, "device_map": {"": device.index or 0}}


def save_template(directory: str | Path, spec: dict) -> Path:
    """Write the exact template a model was trained with (opaque to this layer) as tunesmith_template.json."""
    path = Path(directory) / TEMPLATE_FILE
    path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return path


def load_template(directory: str | Path) -> dict:
    """Read tunesmith_template.json back; UserError when the directory has none."""
    path = Path(directory) / TEMPLATE_FILE
    if not path.is_file():
        raise UserError(
            f"{directory}: no {TEMPLATE_FILE} (not a tunesmith output; pass data.template explicitly)"
        )
    return json.loads(path.read_text())
