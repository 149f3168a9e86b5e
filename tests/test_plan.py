"""plan/ against reality: exact parameter counts, FLOPs vs FlopCounterMode, peak memory vs a tensor tracker"""

import io
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from rich.console import Console
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

import tunesmith.model.loss
import tunesmith.plan.devices
from tests import tiny
from tunesmith.config import Config, LoraConfig, ModelConfig, PlanConfig, TrainConfig
from tunesmith.data.render import IGNORE
from tunesmith.model.loss import loss_sum
from tunesmith.plan.arch import arch_from_config, flops_per_token, param_counts
from tunesmith.plan.estimate import make_plan
from tunesmith.plan.memory import LADDER, Precision, inference_memory, precision_for, training_memory
from tunesmith.runtime import measure_peak_flops
from tunesmith.train.run_plan import compare_measured, plan_for_data, plan_from_run, print_plan

V = 512
SHAPES = {
    "gpt_neox": GPTNeoXConfig(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        tie_word_embeddings=False,
    ),
    "llama": LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    ),
    "qwen2": Qwen2Config(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
    ),
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
    assert param_counts(arch_from_config(cfg))["total"] == 70_426_624


def _batch(rows, seq, vocab=V, prompt=0):
    """A padded micro-batch as the loop sees it: the first `prompt` tokens of each row carry no loss."""
    ids = torch.randint(0, vocab, (rows, seq))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _label_fraction(batch):
    """What start_plan computes from samples: positions that predict a label, over tokens."""
    return (batch["labels"][:, 1:] != IGNORE).sum().item() / batch["input_ids"].numel()


def _train_step(model, batch):
    total, count = loss_sum(
        model, batch
    )  # the loop's loss: head at label positions only, fused where it can be
    (total / count).backward()


def _counted_flops(model, batch):
    with FlopCounterMode(display=False) as counter:
        _train_step(model, batch)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("seq,prompt", [(64, 0), (256, 0), (128, 80)])
def test_full_finetune_flops_match_flop_counter(name, seq, prompt):
    batch = _batch(2, seq, prompt=prompt)
    predicted = flops_per_token(SHAPES[name], seq, label_fraction=_label_fraction(batch))["model"] * 2 * seq
    assert predicted == pytest.approx(_counted_flops(_model(name), batch), rel=0.05)


@pytest.mark.parametrize("name", ["gpt_neox", "llama", pytest.param("qwen2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("prompt", [0, 80])
def test_lora_flops_match_flop_counter(name, prompt):
    lora = LoraConfig(r=8, dropout=0.0)
    peft = get_peft_model(
        _model(name), PeftLoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    batch = _batch(2, 128, prompt=prompt)
    predicted = (
        flops_per_token(SHAPES[name], 128, lora, label_fraction=_label_fraction(batch))["model"] * 2 * 128
    )
    assert predicted == pytest.approx(_counted_flops(peft, batch), rel=0.05)


def test_head_flops_scale_with_the_label_fraction():
    # llama shape: the head is 2 * 64 * 512 FLOPs forward per labelled position, and twice that backward
    arch = arch_from_config(SHAPES["llama"])
    full, quarter = flops_per_token(arch, 128), flops_per_token(arch, 128, label_fraction=0.25)
    assert full["forward"] - quarter["forward"] == 0.75 * 2 * 64 * 512
    assert full["model"] - quarter["model"] == 0.75 * 6 * 64 * 512


@pytest.mark.parametrize("name", ["gpt_neox", "llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_checkpointing_hardware_flops_bound_the_counter(name):
    # Our recompute term redoes each layer's whole forward; torch's non-reentrant checkpoint stops once the
    # saved tensors are rebuilt, so it measures 3-5% less on these tiny models: hence 6% and an upper bound.
    model = _model(name)
    model.gradient_checkpointing_enable()
    predicted = flops_per_token(SHAPES[name], 128, False, True)["hardware"] * 2 * 128
    counted = _counted_flops(model, _batch(2, 128))
    assert counted <= predicted and counted == pytest.approx(predicted, rel=0.06)


def _measured_peak(model, batch):
    """Peak live tensor bytes over two train steps: parameters + the running sum of every allocation and free
    the CPU allocator reported to the profiler (profile_memory=True). Agrees with torch's MemTracker within
    0.1%; RSS would add allocator caching and the Python heap."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            _train_step(model, batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*model.parameters(), *model.buffers()]
    }
    return sum(storages.values()) + max(itertools.accumulate(b for _, b in events))


# full grid measured: full fine-tune 1.04-1.05 x measured, + checkpointing 1.03-1.07 x, LoRA 1.06-1.09 x,
# + checkpointing 0.91-0.99 x
_MEMORY_CASES = [
    pytest.param(
        name,
        lora,
        ckpt,
        marks=()
        if name == "llama" or (name, lora, ckpt) in (("gpt_neox", False, False), ("qwen2", True, False))
        else pytest.mark.slow,
    )
    for name in SHAPES
    for lora in (False, True)
    for ckpt in (False, True)
]


@pytest.mark.parametrize("name,lora,ckpt", _MEMORY_CASES)
def test_peak_training_memory_within_15_percent_on_cpu(name, lora, ckpt):
    model = _model(name, "sdpa")
    if ckpt:
        model.gradient_checkpointing_enable()
    lcfg = LoraConfig(r=8) if lora else None
    if lora:
        model = get_peft_model(
            model, PeftLoraConfig(r=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    cfg = Config(lora=lcfg, train=TrainConfig(batch_size=2, gradient_checkpointing=ckpt))
    predicted = training_memory(arch_from_config(SHAPES[name]), cfg, 2, 128, Precision(4, 4, False, False))[
        "peak"
    ]
    assert predicted == pytest.approx(_measured_peak(model, _batch(2, 128)), rel=0.15)


@pytest.mark.parametrize("base", ["bf16", "fp32+autocast"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_peak_memory_of_lora_on_a_bf16_base_and_under_autocast(base, dropout):
    # PEFT keeps adapters in fp32: over a bf16 base each adapter saves an fp32 copy of its input (the frozen
    # base layer saves none); under autocast the base is fp32 and the matmuls bf16. 8 x 160 tokens, 96 a
    # prompt.
    shape = LlamaConfig(
        vocab_size=4096,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if base == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(shape, attn_implementation="sdpa", dtype=dtype).train()
    model = get_peft_model(
        model, PeftLoraConfig(r=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    batch = _batch(8, 160, 4096, prompt=96)
    cfg = Config(lora=LoraConfig(r=8, dropout=dropout), train=TrainConfig(batch_size=8))
    prec = Precision(2, 2, False, False) if base == "bf16" else Precision(4, 2, True, False)
    predicted = training_memory(arch_from_config(shape), cfg, 8, 160, prec, _label_fraction(batch))["peak"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base != "bf16"):
        measured = _measured_peak(model, batch)
    assert predicted == pytest.approx(measured, rel=0.15)


BIG_V = 16384  # the loss dominates: logits of all 2 x 128 positions would be 8x the rest of the step


@pytest.mark.parametrize("head", ["fused", "fused_chunks", "lora_on_head", "full_ft"])
def test_peak_memory_of_the_loss_at_label_positions(head, monkeypatch):
    # 2 x 128 tokens, 88 of each row a prompt: 40 label positions per row. The planner must count logits at
    # those only, one chunk at a time where the head is fused, (N, V) at once where LoRA wraps the head.
    shape = LlamaConfig(
        vocab_size=BIG_V,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape, attn_implementation="sdpa").train()
    lcfg = None
    if head != "full_ft":
        targets = ["q_proj", "v_proj", "lm_head"] if head == "lora_on_head" else ["q_proj", "v_proj"]
        lcfg = LoraConfig(r=8, dropout=0.0, target_modules=targets)
        model = get_peft_model(
            model, PeftLoraConfig(r=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
        )
    batch = _batch(2, 128, BIG_V, prompt=88)
    cfg = Config(lora=lcfg, train=TrainConfig(batch_size=2))
    fp32 = Precision(4, 4, False, False)
    # what the planner said before it knew the labels and the chunks (every position, in one piece)
    naive = training_memory(arch_from_config(shape), cfg, 2, 128, fp32)["peak"]
    if (
        head == "fused_chunks"
    ):  # 20 rows of logits per chunk: 4 chunks, one alive at a time (the loss and the plan)
        monkeypatch.setattr(tunesmith.model.loss, "LOSS_CHUNK_VALUES", 20 * BIG_V)
    predicted = training_memory(arch_from_config(shape), cfg, 2, 128, fp32, _label_fraction(batch))["peak"]
    measured = _measured_peak(model, batch)
    assert predicted == pytest.approx(measured, rel=0.15)
    assert naive > 1.15 * measured  # so the check above can tell the two models apart


def _seven_b():
    return arch_from_config(
        dict(
            model_type="llama",
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            intermediate_size=11008,
            vocab_size=32000,
        )
    )


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
    cfg = Config(
        model=ModelConfig(name=str(path)),
        train=TrainConfig(batch_size=4, max_steps=10),
        plan=PlanConfig(device="h100-80gb"),
    )
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
    done = compare_measured(
        plan, {"tokens_per_s": plan["time"]["tokens_per_s"] / 2, "peak_memory_bytes": plan["memory"]["peak"]}
    )
    ratios = {r["metric"]: r["ratio"] for r in done["comparison"]}
    assert (
        ratios["tokens_per_s"] == pytest.approx(0.5)
        and ratios["peak_memory_bytes"] == 1
        and ratios["mfu"] is None
    )
    (tmp_path / "plan.json").write_text(json.dumps(done))
    assert plan_from_run(tmp_path)["measured"]["peak_memory_bytes"] == plan["memory"]["peak"]
    out = io.StringIO()
    print_plan(done, Console(file=out, width=160))
    assert "predicted vs measured" in out.getvalue() and "llama-3.1-70b" in out.getvalue()


def test_plan_for_data_counts_the_positions_that_predict_a_label(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tiny.save_model_dir(tmp_path / "m")
    cfg = Config(
        model=ModelConfig(name=str(path)),
        train=TrainConfig(batch_size=2, max_steps=3),
        plan=PlanConfig(device="h100-80gb"),
    )
    # a QA sample (6 prompt tokens, 4 labels: the first label is predicted by the last prompt token) and a
    # text sample (5 labels, its first token predicted by nothing): 4 + 4 of 15 positions
    samples = [
        {"input_ids": list(range(10)), "labels": [IGNORE] * 6 + [6, 7, 8, 9]},
        {"input_ids": list(range(5)), "labels": list(range(5))},
    ]
    plan = plan_for_data(cfg, samples)
    assert plan["run"]["label_fraction"] == pytest.approx(8 / 15)
    every = make_plan(cfg)
    c = tiny.gpt_neox().config
    head = 2 * c.hidden_size * c.vocab_size  # the head's forward FLOPs per position
    assert every["flops"]["forward"] - plan["flops"]["forward"] == pytest.approx(head * 7 / 15, abs=1)


def test_cpu_peak_is_measured_once_per_process_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / "peak_flops.json"
    first = measure_peak_flops("cpu", cache=cache)
    assert first > 1e8  # any CPU does 0.1 GFLOP/s
    assert list(json.loads(cache.read_text()).values()) == [first]
    assert measure_peak_flops("cpu", cache=cache) == first


_RSS_SCRIPT = """
import torch
from tunesmith.runtime import reset_peak_rss
from tunesmith.train.run_plan import peak_memory_bytes
cpu = torch.device("cpu")
# 400 MiB, touched, freed: a peak before the model (importing, data) is not training's
x = torch.ones(100 * 2**20)
del x
before = reset_peak_rss()
y = torch.ones(50 * 2**20)  # 200 MiB
print(peak_memory_bytes(cpu, before))
"""


def test_cpu_peak_memory_is_the_growth_above_the_process_before_the_model():
    # in a fresh process: pytest's own peak must not count (a child even inherits getrusage's maxrss on Linux)
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, check=True
    ).stdout
    assert int(out) == pytest.approx(200 * 2**20, rel=0.1)


@pytest.mark.parametrize(
    "native,precision,calibrated,autocast",
    [
        (False, "auto", False, "fp32"),  # AVX2-only CPU: auto trains fp32, so the plan times the fp32 Linear
        (False, "bf16", True, "bf16"),  # asked for bf16 there anyway: the plan times what that run will do
        (True, "auto", True, "bf16"),  # AVX512-BF16/AMX: bf16 autocast
        (True, "fp32", False, "fp32"),
    ],
)
def test_cpu_plan_calibrates_the_precision_the_run_uses(
    tmp_path, monkeypatch, native, precision, calibrated, autocast
):
    import tunesmith.runtime

    speeds = {False: 103e9, True: 13.6e9 if not native else 300e9}  # fp32 / bf16-autocast Linear FLOP/s
    asked = []
    monkeypatch.setattr(tunesmith.runtime, "device", lambda dist=None: torch.device("cpu"))
    monkeypatch.setattr(tunesmith.runtime, "fast_bf16", lambda dev: native)
    monkeypatch.setattr(
        tunesmith.plan.devices,
        "calibrated_peak_flops",
        lambda dev, bf16=False: asked.append(bf16) or speeds[bf16],
    )
    path = tiny.save_model_dir(tmp_path / "m")
    plan = make_plan(
        Config(model=ModelConfig(name=str(path)), train=TrainConfig(max_steps=3, precision=precision))
    )
    assert asked == [calibrated]
    assert plan["time"]["peak_flops"] == speeds[calibrated] and plan["time"]["autocast"] == autocast
    assert plan["run"]["activation_bytes"] == (2 if autocast == "bf16" else 4)
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=200))
    assert f"(cpu, {autocast} matmuls)" in out.getvalue()


def test_cpu_calibration_times_the_autocast_linear_and_caches_it_apart(tmp_path, monkeypatch):
    import tunesmith.runtime

    timed = []
    monkeypatch.setattr(
        tunesmith.runtime,
        "_matmul_flops",
        lambda dev, amp: timed.append(amp) or (1e11 if amp is None else 2e10),
    )
    cache = tmp_path / "peak_flops.json"
    assert measure_peak_flops("cpu", cache=cache) == 1e11
    assert measure_peak_flops("cpu", bf16=True, cache=cache) == 2e10
    assert (
        measure_peak_flops("cpu", bf16=True, cache=cache) == 2e10
    )  # from the cache: timed once in this process
    assert timed == [None, torch.bfloat16]
    keys = list(json.loads(cache.read_text()))
    assert (
        len(keys) == 2 and keys[1] == keys[0] + ":autocast-bf16"
    )  # not ':bf16', the raw GEMMs older versions cached


def test_each_process_times_the_peak_again_and_keeps_the_best(tmp_path, monkeypatch):
    # A cached peak timed while the machine was busy (too low: MFU would read above 1) is raised by the next
    # process's timing; a higher cached peak is never lowered by a slow moment.
    import tunesmith.runtime

    monkeypatch.setattr(tunesmith.runtime, "_matmul_flops", lambda dev, amp: 5e10)
    low, high = tmp_path / "low.json", tmp_path / "high.json"
    key = f"cpu:{os.cpu_count()}:{torch.get_num_threads()}"
    low.write_text(json.dumps({key: 1e9}))
    high.write_text(json.dumps({key: 9e11}))
    assert measure_peak_flops("cpu", cache=low) == 5e10 and json.loads(low.read_text())[key] == 5e10
    assert measure_peak_flops("cpu", cache=high) == 9e11 and json.loads(high.read_text())[key] == 9e11
    monkeypatch.setattr(
        tunesmith.runtime, "_matmul_flops", lambda dev, amp: pytest.fail("timed twice in one process")
    )
    assert measure_peak_flops("cpu", cache=low) == 5e10


def test_timing_the_peak_leaves_the_global_rng_alone():
    # Each run times the peak after seeding (a resume: after restoring the RNG); moving the global state would
    # break bit-identical resume.
    from tunesmith.runtime import _matmul_flops

    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    _matmul_flops(torch.device("cpu"), None, budget_s=0.05)
    assert torch.equal(torch.rand(3), expected)
