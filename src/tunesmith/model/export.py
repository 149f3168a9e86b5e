"""Write a trained model as a plain HF dir (or PEFT adapter dir), and load either back for inference.

A full model loads with `AutoModelForCausalLM.from_pretrained`, an adapter with `PeftModel.from_pretrained`;
the tokenizer and `tunesmith_template.json` sit beside the weights. An adapter records the base model as the
user named it (e.g. `smollm2-135m-instruct`), so `load_for_inference` re-resolves it on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config import ModelConfig, UserError, load_config
from tunesmith.model.load import TEMPLATE_FILE, load_model, load_template, save_template

ADAPTER_CONFIG = "adapter_config.json"


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_final(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path, template: dict | None, merge: bool
) -> Path:
    """Save a full model, an adapter, or (merge=True) the adapter merged into its base; atomic at `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if _is_peft(model):
            _save_adapter(model, tmp)
            if (
                merge
            ):  # merge from the saved adapter: leaves the live PeftModel untouched, works for QLoRA too
                merged = tmp.with_name(tmp.name + "-merged")
                _merge_adapter_dir(tmp, merged, _base_config(model))
                shutil.rmtree(tmp)
                tmp = merged
        else:
            model.save_pretrained(tmp)  # safetensors (the only format transformers 5 writes)
        tokenizer.save_pretrained(tmp)
        if template is not None:
            save_template(tmp, template)
        tmp.chmod(0o755)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _base_config(model: nn.Module) -> ModelConfig:
    """The ModelConfig the base was loaded with (load_model records it), else one naming its path."""
    base = model.get_base_model()
    return getattr(base, "tunesmith_model_config", None) or ModelConfig(name=base.name_or_path)


def _base_name(model: nn.Module) -> str:
    return _base_config(model).name


def _save_adapter(model: nn.Module, out: Path) -> None:
    """PEFT adapter weights + adapter_config.json naming the base as the user gave it."""
    for peft_cfg in model.peft_config.values():
        peft_cfg.base_model_name_or_path = _base_name(model)
    model.save_pretrained(out)


def _merge_adapter_dir(adapter: Path, out: Path, base_cfg: ModelConfig) -> None:
    """Load the base unquantized on CPU, apply the adapter, merge, save a plain HF dir at `out`."""
    from peft import PeftModel

    base = load_model(base_cfg, torch.device("cpu"))
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is renamed away first and deleted only after the move."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _final_dir(path: Path) -> Path:
    """A run dir means its final/; anything else is taken as the model dir itself."""
    return path / "final" if (path / "final").is_dir() else path


def _run_model_config(run_dir: Path, name: str) -> ModelConfig:
    """The run's model section (dtype, trust_remote_code, cache) with `name` as the model."""
    cfg_path = run_dir / "config.yaml"
    base = load_config(cfg_path).model if cfg_path.is_file() else ModelConfig()
    return base.model_copy(update={"name": name})


def export(run_dir: Path, out: Path, merge: bool) -> Path:
    """`tunesmith export RUN_DIR [--merge]`: copy final/ to `out`; merge an adapter into its base if asked."""
    run_dir = Path(run_dir)
    src = _final_dir(run_dir)
    if not (src / "config.json").is_file() and not (src / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"{run_dir}: no final model (expected {src}/config.json or {src}/{ADAPTER_CONFIG}; "
            "has training finished?)"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if merge and (src / ADAPTER_CONFIG).is_file():
            base = json.loads((src / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            shutil.rmtree(tmp)
            _merge_adapter_dir(src, tmp, _run_model_config(run_dir, base))
            for f in src.iterdir():  # tokenizer files and the template travel with the merged weights
                if f.is_file() and not f.name.startswith("adapter_"):
                    shutil.copy2(f, tmp / f.name)
        else:
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_for_inference(
    path: str, cfg: ModelConfig, device: torch.device
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict | None]:
    """(model in eval mode, tokenizer, template or None) from a full model dir, adapter dir or run dir."""
    from tunesmith.model.load import load_tokenizer

    src = _final_dir(Path(path))
    name = str(src) if src.is_dir() else path
    if (src / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        name = json.loads((src / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        model = load_model(cfg.model_copy(update={"name": name}), device)
        # merged for inference: one matmul per layer instead of base + A·B
        model = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
    else:
        model = load_model(cfg.model_copy(update={"name": name}), device)
    # the tokenizer saved with the run when there is one, else the base's: both pass load_tokenizer's checks
    tok_name = str(src) if (src / "tokenizer_config.json").is_file() else name
    tokenizer = load_tokenizer(cfg.model_copy(update={"name": tok_name}))
    template = load_template(src) if (src / TEMPLATE_FILE).is_file() else None
    return model.eval(), tokenizer, template
