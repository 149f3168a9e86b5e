"""generate.py on tiny real models: left-padded batches == single prompts, EOS, stop strings, length, seeds,
streaming.
"""

import pytest
import torch

from tests import tiny
from tunesmith.config import GenerateConfig
from tunesmith.data.formats import Example, get_template
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import render, render_prompt
from tunesmith.generate import TextDelta, cut_at_stop, generate, stream

PROMPTS = [
    "What was the revenue of Acme?",
    "hello",
    "The quick brown fox jumps over the lazy dog. Fine-tuning",
    "How many employees",
    "user assistant system hello world the answer is 42",
]


def _ids(tok, texts=PROMPTS):
    return [tok(t)["input_ids"] for t in texts]


def _hf_single(model, tok, ids, n):
    """Reference: plain HF greedy generate on one unpadded prompt, no EOS stopping."""
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("build", [tiny.gpt_neox, tiny.llama])
def test_left_padded_batch_equals_single_prompts(build):
    model, tok = build(), tiny.tokenizer()
    model.generation_config.eos_token_id = None
    prompts = _ids(tok)
    assert len({len(p) for p in prompts}) > 2  # real padding happens
    cfg = GenerateConfig(max_new_tokens=12, batch_size=8)
    # a vocab token that is never generated stands in for EOS, so all rows run the full length
    tok.eos_token = "<|im_start|>"
    batched = generate(model, tok, prompts, cfg)
    for p, c in zip(prompts, batched, strict=True):
        assert c.ids == _hf_single(model, tok, p, 12)
        assert c.prompt_tokens == len(p) and c.finish_reason == "length"
        assert c.text == tok.decode(c.ids, skip_special_tokens=True)
    # batch size 2 (other groupings, other padding) gives the same answers in input order
    assert [c.ids for c in generate(model, tok, prompts, cfg.model_copy(update={"batch_size": 2}))] == [
        c.ids for c in batched
    ]


def test_stops_at_tokenizer_eos_and_model_eos():
    model, tok = tiny.gpt_neox(), tiny.tokenizer()
    model.generation_config.eos_token_id = None
    prompt = _ids(tok)[0]
    ref = _hf_single(model, tok, prompt, 10)
    k = next(i for i in range(2, 10) if ref[i] not in ref[:i])  # first step whose token is new
    cfg = GenerateConfig(max_new_tokens=10)
    # 1) the model's generation_config names the token as EOS
    model.generation_config.eos_token_id = [ref[k]]
    (c,) = generate(model, tok, [prompt], cfg)
    assert (c.ids, c.finish_reason) == (ref[:k], "stop")
    # 2) the tokenizer's EOS is that token
    model.generation_config.eos_token_id = None
    tok.eos_token = tok.convert_ids_to_tokens(ref[k])
    (c,) = generate(model, tok, [prompt], cfg)
    assert (c.ids, c.finish_reason) == (ref[:k], "stop")


def test_eos_in_a_batch_stops_only_that_row():
    model, tok = tiny.llama(), tiny.tokenizer()
    model.generation_config.eos_token_id = None
    prompts = _ids(tok)[:3]
    refs = [_hf_single(model, tok, p, 8) for p in prompts]
    eos = refs[0][3]
    model.generation_config.eos_token_id = [eos]
    out = generate(model, tok, prompts, GenerateConfig(max_new_tokens=8))
    for ref, c in zip(refs, out, strict=True):
        cut = ref.index(eos) if eos in ref else len(ref)
        assert c.ids == ref[:cut]
        assert c.finish_reason == ("stop" if eos in ref else "length")


def test_stop_strings_cut_the_text():
    model, tok = tiny.gpt_neox(), tiny.tokenizer()
    tok.eos_token = "<|im_start|>"
    model.generation_config.eos_token_id = None
    prompt = _ids(tok)[2]
    full = generate(model, tok, [prompt], GenerateConfig(max_new_tokens=16))[0]
    assert len(full.text) > 6
    stop = full.text[4:6]  # two characters from the middle of the greedy answer
    (c,) = generate(model, tok, [prompt], GenerateConfig(max_new_tokens=16, stop=[stop]))
    assert c.text == full.text[: full.text.index(stop)]
    assert c.finish_reason == "stop"
    assert len(c.ids) < len(full.ids)  # generation really stopped early
    assert stop in tok.decode(c.ids) and c.ids == full.ids[: len(c.ids)]


def test_max_new_tokens_gives_length():
    model, tok = tiny.gpt_neox(), tiny.tokenizer()
    model.generation_config.eos_token_id = None
    tok.eos_token = "<|im_start|>"
    out = generate(model, tok, _ids(tok)[:2], GenerateConfig(max_new_tokens=5))
    assert [(len(c.ids), c.finish_reason) for c in out] == [(5, "length"), (5, "length")]


def test_sampling_is_reproducible_with_the_seed():
    model, tok = tiny.llama(), tiny.tokenizer()
    prompts = _ids(tok)
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    a = [c.ids for c in generate(model, tok, prompts, cfg)]
    torch.manual_seed(123)  # the caller's RNG state must not matter
    b = [c.ids for c in generate(model, tok, prompts, cfg)]
    c = [c.ids for c in generate(model, tok, prompts, cfg.model_copy(update={"seed": 8}))]
    greedy = [c.ids for c in generate(model, tok, prompts, GenerateConfig(max_new_tokens=10))]
    assert a == b
    assert a != c and a != greedy


def test_stream_joins_to_generate_text():
    model, tok = tiny.gpt_neox(), tiny.tokenizer()
    prompt = _ids(tok)[0]
    for stop in ([], [" the", "e"]):
        cfg = GenerateConfig(max_new_tokens=20, stop=stop)
        pieces = list(stream(model, tok, prompt, cfg))
        assert "".join(pieces) == generate(model, tok, [prompt], cfg)[0].text
        assert len(pieces) > 1 or stop


def test_stream_closed_early_stops_the_worker():
    import threading

    model, tok = tiny.gpt_neox(), tiny.tokenizer()
    prompt = _ids(tok)[0]
    forwards = []  # one forward pass per generated token
    model.register_forward_hook(lambda *_: forwards.append(1))
    before = set(threading.enumerate())
    it = stream(model, tok, prompt, GenerateConfig(max_new_tokens=400))
    next(it)
    (worker,) = [t for t in threading.enumerate() if t not in before and t.name == "tunesmith-stream"]
    it.close()  # sets the stop flag and joins the generation thread
    assert not worker.is_alive()  # close() returned only once generation had stopped...
    n = len(forwards)
    assert n < 400  # ...long before max_new_tokens
    # and it stopped because it was told to: left alone, the same greedy answer runs past n tokens (no EOS
    # there)
    assert generate(model, tok, [prompt], GenerateConfig(max_new_tokens=n + 8))[0].finish_reason == "length"


def test_text_delta_holds_back_stop_prefixes():
    tok = tiny.tokenizer()
    ids = tok("hello world the answer")["input_ids"]
    d = TextDelta(tok, ["the answer"], eos=[tok.eos_token_id])
    shown = "".join(d.push(i) for i in ids) + d.flush()
    assert shown == "hello world "
    assert cut_at_stop("a STOP b STOP", [" b", "STOP"]) == ("a ", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)


def test_template_round_trip_prompt_ids_match_training():
    tok = tiny.tokenizer()
    rejects = Rejects("fail")
    qa = Example(where="t:1", fields={"question": "What was the revenue of Acme?", "answer": "$34 million."})
    chat = Example(
        where="t:2",
        messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}],
    )
    for ex, template in ((qa, get_template("qa", "qa")), (chat, get_template("chat", "chat"))):
        (sample,) = render([ex], template, tok, max_length=512, truncation="prompt_left", rejects=rejects)
        n_prompt = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        assert render_prompt(ex, template, tok) == sample["input_ids"][:n_prompt]
        # and a served request (no answer yet) renders the same prompt
        request = (
            Example(where="request", fields={"question": ex.fields["question"]})
            if ex.fields
            else Example(where="request", messages=ex.messages[:1])
        )
        assert render_prompt(request, template, tok) == sample["input_ids"][:n_prompt]


def test_peft_wrapped_model_generates_like_merged():
    from peft import LoraConfig, get_peft_model

    tok = tiny.tokenizer()
    tok.eos_token = "<|im_start|>"
    base = tiny.gpt_neox()
    base.generation_config.eos_token_id = None
    torch.manual_seed(1)
    peft = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query_key_value", "dense_4h_to_h"], init_lora_weights=False)
    ).eval()
    prompts = _ids(tok)
    cfg = GenerateConfig(max_new_tokens=8)
    wrapped = [c.ids for c in generate(peft, tok, prompts, cfg)]
    with peft.disable_adapter():
        plain = [c.ids for c in generate(peft, tok, prompts, cfg)]
    merged = peft.merge_and_unload()
    assert wrapped == [c.ids for c in generate(merged, tok, prompts, cfg)]
    assert plain != wrapped


def _run_cli(monkeypatch, capsys, *argv, stdin: str = "") -> tuple[int, str, str]:
    """`tunesmith ARGV` through the console entry point -> (exit code, stdout, stderr)."""
    import io
    import sys

    from tunesmith import cli

    monkeypatch.setattr(sys, "argv", ["tunesmith", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setenv("COLUMNS", "1000")  # rich does not wrap an answer
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _saved_model(tmp_path):
    """A tiny model dir and the same weights in memory, as load_for_inference sees them (EOS from config)"""
    model_dir = tiny.save_model_dir(tmp_path / "m")
    model, tok = tiny.gpt_neox(), tiny.tokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    config = tmp_path / "c.yaml"
    config.write_text("generate: {max_new_tokens: 6}\n")
    return str(config), [f"model.name={model_dir}", f"out_dir={tmp_path / 'run'}"], model, tok


def test_generate_command_prompt_and_jsonl(tmp_path, monkeypatch, capsys):
    import json

    from tunesmith.generate import prompt_ids

    config, overrides, model, tok = _saved_model(tmp_path)
    template = get_template("qa", "qa")
    want = generate(
        model,
        tok,
        [
            prompt_ids(template, tok, [{"role": "user", "content": q}])
            for q in ("What was the revenue?", "hello")
        ],
        GenerateConfig(max_new_tokens=6),
    )
    assert _run_cli(monkeypatch, capsys, "generate", config, *overrides, "--prompt", "What was the revenue?")[
        :2
    ] == (0, want[0].text + "\n")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"question": "What was the revenue?"}\n{"prompt": "hello"}\n')
    assert (
        _run_cli(
            monkeypatch, capsys, "generate", config, *overrides, "--input", str(src), "--output", str(out)
        )[0]
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [w.text for w in want]
    assert rows[1] == {
        "prompt": "hello",
        "answer": want[1].text,
        "finish_reason": want[1].finish_reason,
        "prompt_tokens": want[1].prompt_tokens,
        "completion_tokens": len(want[1].ids),
    }
    src.write_text('{"nothing": 1}\n')
    code, _, err = _run_cli(monkeypatch, capsys, "generate", config, *overrides, "--input", str(src))
    assert (
        code == 2
        and err.startswith(f"error: {src}:1: row needs 'prompt'")
        and len(err.strip().splitlines()) == 1
    )
    code, _, err = _run_cli(
        monkeypatch, capsys, "generate", config, *overrides, "--prompt", "a", "--input", str(src)
    )
    assert (code, err.strip()) == (2, "error: generate: give exactly one of --prompt or --input")


def test_chat_command_keeps_history_until_reset(tmp_path, monkeypatch, capsys):
    from tunesmith.generate import prompt_ids

    config, overrides, model, tok = _saved_model(tmp_path)
    template = get_template("chat", "chat")
    cfg = GenerateConfig(max_new_tokens=6)

    def answer(*turns):
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
        ]
        return generate(model, tok, [prompt_ids(template, tok, messages)], cfg)[0].text

    first = answer("hello")
    second = answer("hello", first, "what else")
    # history changes the answer, so the test can see whether it was kept (and whether /reset dropped it)
    assert second != answer("what else") != answer("hello", first, "what else", second, "what else")
    code, out, _ = _run_cli(
        monkeypatch,
        capsys,
        "chat",
        config,
        *overrides,
        "data.format=chat",
        stdin="hello\nwhat else\n\n/reset\nwhat else\n/exit\nnever read\n",
    )
    assert code == 0
    assert out == (
        f"you> model> {first}\nyou> model> {second}\nyou> you> you> model> {answer('what else')}\nyou> "
    )
    # a string template answers each question on its own, and end of input leaves like /exit
    code, out, _ = _run_cli(monkeypatch, capsys, "chat", config, *overrides, stdin="hello\nhello\n")
    qa = generate(
        model, tok, [prompt_ids(get_template("qa", "qa"), tok, [{"role": "user", "content": "hello"}])], cfg
    )[0].text
    assert code == 0 and out == (
        f"string template: each question is answered on its own (no history)\n"
        f"you> model> {qa}\nyou> model> {qa}\nyou> "
    )


def test_a_vanishing_temperature_decodes_greedily():
    # logits / 1e-300 overflow float32 to inf (NaN probabilities): below 1e-4 the engine takes the argmax
    from tunesmith.config import GenerateConfig
    from tunesmith.generate import _sampling_args

    assert _sampling_args(GenerateConfig(temperature=1e-300))["do_sample"] is False
    assert _sampling_args(GenerateConfig(temperature=0.7))["do_sample"] is True
