"""LoRA / QLoRA through PEFT on the real model: no parallel model classes, no second training loop.

LoRA changes three things only: which parameters train (the adapters, plus `modules_to_save`), what a
checkpoint holds (the adapter), and whether export merges.
"""

from __future__ import annotations

from torch import nn

from tunesmith.config import LoraConfig


def apply_lora(model: nn.Module, cfg: LoraConfig, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap `model` in a PeftModel with LoRA adapters on `cfg.target_modules`; base weights freeze."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # casts norms/embeddings to fp32 for stable QLoRA; checkpointing itself stays the loop's choice
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # frozen embeddings give the first checkpointed block an input without grad; this makes it require one
        model.enable_input_require_grads()
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,  # "all-linear" = every Linear but the output head (PEFT's rule)
        modules_to_save=cfg.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT corrects the 4-bit packing (2 values per byte)
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
