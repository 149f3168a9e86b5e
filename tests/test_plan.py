"""plan.py against reality: exact parameter counts, FLOPs vs FlopCounterMode, peak memory vs a tensor tracker."""

import io
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from rich.console import Console
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

from tests import tiny
from tunesmith.config import Config, LoraConfig, ModelConfig, PlanConfig, TrainConfig
from tunesmith.plan import (
    LADDER,
    Precision,
    arch_from_config,
    compare_measured,
    flops_per_token,
    inference_memory,
    make_plan,
    measure_peak_flops,
    param_counts,
    plan_from_run,
    precision_for,
    print_plan,
    training_memory,
)

V = 512
SHAPES = {
    "gpt_neox": GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                              rotary_pct=0.25, tie_word_embeddings=False),
    "llama": LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, tie_word_embeddings=False),
    "qwen2": Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, tie_word_embeddings=True),
}


def _model(name, attn="eager"):
    torch.manual_seed(0)
    cfg = SHAPES[name]
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).train()


@pytest.mark.parametrize("name", SHAPES)
def test_param_counts_are_exact(name):
    model = _model(name)
    assert param_counts(arch_from_config(model.config))["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "query_key_value", "dense_4h_to_h"]])
def test_lora_counts_match_a_real_peft_wrap(name, targets):
    lora = LoraConfig(r=8, target_modules=targets)
    peft = get_peft_model(_model(name), PeftLoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    trainable, total = peft.get_nb_trainable_parameters()
    counts = param_counts(arch_from_config(SHAPES[name]), lora)
    assert (counts["trainable"], counts["total"]) == (trainable, total)


def test_pythia_70m_count_from_config_alone():
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                        rotary_pct=0.25, max_position_embeddings=2048, tie_word_embeddings=False)
    assert param_counts(arch_from_config(cfg))["total"] == 70_426_624


def _counted_flops(model, rows, seq):
    ids = torch.randint(0, V, (rows, seq))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits.view(-1, V), ids.view(-1)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("seq", [64, 256])
def test_full_finetune_flops_match_flop_counter(name, seq):
    predicted = flops_per_token(SHAPES[name], seq)["model"] * 2 * seq
    assert predicted == pytest.approx(_counted_flops(_model(name), 2, seq), rel=0.05)


@pytest.mark.parametrize("name", ["gpt_neox", "llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_lora_flops_match_flop_counter(name):
    lora = LoraConfig(r=8, dropout=0.0)
    peft = get_peft_model(_model(name), PeftLoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    predicted = flops_per_token(SHAPES[name], 128, lora)["model"] * 2 * 128
    assert predicted == pytest.approx(_counted_flops(peft, 2, 128), rel=0.05)


@pytest.mark.parametrize("name", ["gpt_neox", "llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_checkpointing_hardware_flops_bound_the_counter(name):
    # Our recompute term redoes each layer's whole forward; torch's non-reentrant checkpoint stops once the
    # saved tensors are rebuilt, so it measures 3-5% less on these tiny models: hence 6% and an upper bound.
    model = _model(name)
    model.gradient_checkpointing_enable()
    predicted = flops_per_token(SHAPES[name], 128, False, True)["hardware"] * 2 * 128
    counted = _counted_flops(model, 2, 128)
    assert counted <= predicted and counted == pytest.approx(predicted, rel=0.06)


def _measured_peak(model, rows, seq):
    """Peak live tensor bytes over two train steps: parameters + the running sum of every allocation and free the
    CPU allocator reported to the profiler (profile_memory=True). Agrees with torch's MemTracker within 0.1%;
    RSS would add allocator caching and the Python heap."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, V, (rows, seq))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            logits = model(input_ids=ids, use_cache=False).logits  # kept through backward, as a loop does
            F.cross_entropy(logits.view(-1, V), ids.view(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values()) + max(itertools.accumulate(b for _, b in events))


# full grid measured: full fine-tune 0.99-1.02 x measured, LoRA 1.06-1.10 x, LoRA + checkpointing 0.86-0.88 x
_MEMORY_CASES = [
    pytest.param(name, lora, ckpt, marks=() if name == "llama" or (name, lora, ckpt) in (("gpt_neox", False, False), ("qwen2", True, False)) else pytest.mark.slow)
    for name in SHAPES for lora in (False, True) for ckpt in (False, True)
]


@pytest.mark.parametrize("name,lora,ckpt", _MEMORY_CASES)
def test_peak_training_memory_within_15_percent_on_cpu(name, lora, ckpt):
    model = _model(name, "sdpa")
    if ckpt:
        model.gradient_checkpointing_enable()
    lcfg = LoraConfig(r=8) if lora else None
    if lora:
        model = get_peft_model(model, PeftLoraConfig(r=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    cfg = Config(lora=lcfg, train=TrainConfig(batch_size=2, gradient_checkpointing=ckpt))
    predicted = training_memory(arch_from_config(SHAPES[name]), cfg, 2, 128, Precision(4, 4, False, False))["peak"]
    assert predicted == pytest.approx(_measured_peak(model, 2, 128), rel=0.15)


def _seven_b():
    return arch_from_config(dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 intermediate_size=11008, vocab_size=32000))


def test_7b_mixed_precision_is_16_bytes_per_param_before_activations():
    arch = _seven_b()
    n = param_counts(arch)["total"]
    assert n == 6_738_415_616  # Llama-2-7B
    # fp32 params (they are the master copy) + bf16 autocast: 4 weights + 4 grads + 8 AdamW moments
    amp = Config(model=ModelConfig(dtype="float32"), train=TrainConfig(precision="bf16"))
    mem = training_memory(arch, amp, 1, 16, precision_for(amp, cuda=True, bf16=True))
    assert (mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["master_weights"]) / n == 16
    # where we differ: autocast's bf16 copies of every Linear weight stay alive until backward (+2 bytes)
    assert mem["autocast_weight_copies"] / n == pytest.approx(2, rel=0.02)
    # our CUDA default (model.dtype auto -> bf16 params, no master copy): 2 + 2 + 4 bytes
    pure = Config()
    mem = training_memory(arch, pure, 1, 16, precision_for(pure, cuda=True, bf16=True))
    assert (mem["weights"] + mem["gradients"] + mem["optimizer"]) / n == 8


def test_qlora_7b_weights_are_about_half_a_byte_per_linear_param():
    arch = _seven_b()
    cfg = Config(lora=LoraConfig(r=16, quantize="4bit"))
    mem = training_memory(arch, cfg, 1, 16, precision_for(cfg, cuda=True, bf16=True))
    linear = sum(x.fan_in * x.fan_out for x in arch.linears if x.layer >= 0)
    unquantized = param_counts(arch)["total"] - linear
    assert mem["weights"] == int(linear * (4 + 8 / 64 + 32 / 16384) / 8) + unquantized * 4
    assert 3.5 * 2**30 < mem["weights"] < 4.5 * 2**30


def test_kv_cache_of_llama3_8b_at_8k_is_one_gib():
    # 2 (K,V) x 32 layers x 8 kv heads x 128 dims x 8192 tokens x 2 bytes
    assert inference_memory(arch_from_config(LADDER["llama-3.1-8b"]), 1, 8192)["kv_cache"] == 2**30


def test_make_plan_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the GEMM calibration cache lands here
    path = tiny.save_model_dir(tmp_path / "m")
    cfg = Config(model=ModelConfig(name=str(path)), train=TrainConfig(batch_size=4, max_steps=10), plan=PlanConfig(device="h100-80gb"))
    plan = make_plan(cfg)
    json.dumps(plan)  # serialisable as is
    assert plan["model"]["total"] == sum(p.numel() for p in tiny.gpt_neox().parameters())
    assert plan["run"]["tokens_per_step"] == 4 * 512 and plan["run"]["weight_bytes"] == 2
    assert plan["flops"]["total"] == plan["flops"]["per_step"] * 10
    assert plan["memory"]["fits"] and plan["memory"]["max_micro_batch"] >= 4
    assert plan["time"]["tokens_per_s"] == pytest.approx(989e12 * 0.35 / plan["flops"]["model"])
    rows = {r["model"]: r for r in plan["what_can_i_run"]}
    assert all(rows["pythia-70m"]["fits"].values())
    assert not rows["llama-3.1-70b"]["fits"]["full"] and rows["llama-3.1-70b"]["fits"]["qlora"]
    done = compare_measured(plan, {"tokens_per_s": plan["time"]["tokens_per_s"] / 2, "peak_memory_bytes": plan["memory"]["peak"]})
    ratios = {r["metric"]: r["ratio"] for r in done["comparison"]}
    assert ratios["tokens_per_s"] == pytest.approx(0.5) and ratios["peak_memory_bytes"] == 1 and ratios["mfu"] is None
    (tmp_path / "plan.json").write_text(json.dumps(done))
    assert plan_from_run(tmp_path)["measured"]["peak_memory_bytes"] == plan["memory"]["peak"]
    out = io.StringIO()
    print_plan(done, Console(file=out, width=160))
    assert "predicted vs measured" in out.getvalue() and "llama-3.1-70b" in out.getvalue()


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    first = measure_peak_flops("cpu")
    assert first > 1e8  # any CPU does 0.1 GFLOP/s
    cache = tmp_path / ".cache" / "tunesmith" / "peak_flops.json"
    assert list(json.loads(cache.read_text()).values()) == [first]
    assert measure_peak_flops("cpu") == first
