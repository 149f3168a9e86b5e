"""model/lora.py, model/export.py: adapters train alone, merge exactly, save/export/load in plain HF+PEFT."""

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests import tiny
from tunesmith.config import LoraConfig, ModelConfig
from tunesmith.model.export import export, load_for_inference, save_final
from tunesmith.model.load import load_model, load_tokenizer
from tunesmith.model.lora import apply_lora, trainable_summary

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


def _base(tmp_path, arch="llama"):
    path = tiny.save_model_dir(tmp_path / "base", arch=arch)
    cfg = ModelConfig(name=str(path))
    return load_model(cfg, CPU), load_tokenizer(cfg), cfg


def _nudge_adapters(model):
    """LoRA B starts at zero (adapter = identity); give it values so merge/export are actually tested."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def test_all_linear_adapts_every_linear_but_the_head(tmp_path):
    model, _, _ = _base(tmp_path)
    peft = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    # tiny llama: d=32, 4 heads x 8, 2 kv heads, ffn 64; r*(in+out) per adapted Linear:
    # q 4*(32+32)=256, k 4*(32+16)=192, v 192, o 256, gate 4*(32+64)=384, up 384, down 384 -> 2048 per layer
    trainable, total = trainable_summary(peft)
    assert trainable == 2 * 2048
    assert total == sum(p.numel() for p in tiny.llama().parameters()) + trainable
    assert all("lora_" in n for n, p in peft.named_parameters() if p.requires_grad)


def test_one_step_changes_only_adapters(tmp_path):
    model, _, _ = _base(tmp_path)
    peft = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    _nudge_adapters(peft)
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    for n, p in peft.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == ("lora_" in n), n


def test_modules_to_save_trains_the_head_too(tmp_path):
    model, _, _ = _base(tmp_path, arch="gpt_neox")
    peft = apply_lora(model, LoraConfig(r=2, target_modules=["query_key_value"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in trainable)
    assert trainable_summary(peft)[0] == 2 * 2 * (32 + 96) + 400 * 32  # qkv adapters + a full head copy


def test_adapter_save_loads_with_plain_peft_and_names_the_base(tmp_path):
    model, tok, cfg = _base(tmp_path)
    peft = apply_lora(model, LoraConfig(r=4, dropout=0.0))
    _nudge_adapters(peft)
    expected = peft(input_ids=IDS).logits
    out = save_final(peft, tok, tmp_path / "final", {"template": "qa"}, merge=False)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == cfg.name
    assert (out / "adapter_model.safetensors").is_file() and (out / "tunesmith_template.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.name), str(out))
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected)
    model2, tok2, template = load_for_inference(str(out), cfg, CPU)
    torch.testing.assert_close(model2(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert template == {"template": "qa"} and tok2.pad_token == tok.pad_token


def test_merged_save_is_a_plain_model_with_the_same_outputs(tmp_path):
    model, tok, _ = _base(tmp_path)
    peft = apply_lora(model, LoraConfig(r=4, dropout=0.0))
    _nudge_adapters(peft)
    expected = peft(input_ids=IDS).logits
    out = save_final(peft, tok, tmp_path / "final", None, merge=True)
    assert not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(plain(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert "lora" not in json.dumps(list(plain.state_dict()))
    assert any("lora_" in n for n, _ in peft.named_parameters())  # the live model is left as it was


def test_full_model_save_and_export_merge_from_a_run_dir(tmp_path):
    model, tok, _ = _base(tmp_path)
    save_final(model, tok, tmp_path / "run" / "final", {"t": 1}, merge=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    torch.testing.assert_close(plain(input_ids=IDS).logits, model(input_ids=IDS).logits)
    copied = export(tmp_path / "run", tmp_path / "exported", merge=True)  # nothing to merge: a copy
    assert (copied / "tunesmith_template.json").is_file() and (copied / "model.safetensors").is_file()


def test_export_merge_of_an_adapter_run(tmp_path):
    model, tok, _ = _base(tmp_path)
    peft = apply_lora(model, LoraConfig(r=4, dropout=0.0))
    _nudge_adapters(peft)
    expected = peft(input_ids=IDS).logits
    save_final(peft, tok, tmp_path / "run" / "final", {"t": 1}, merge=False)
    out = export(tmp_path / "run", tmp_path / "merged", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(plain(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "tunesmith_template.json").is_file()
    assert not (out / "adapter_config.json").exists()
