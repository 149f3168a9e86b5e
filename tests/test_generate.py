"""generate.py on tiny real models: left-padded batches == single prompts, EOS, stop strings, length, seeds, streaming."""

import pytest
import torch

from tests import tiny
from tunesmith.config import GenerateConfig
from tunesmith.data.formats import Example, get_template
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import render, render_prompt
from tunesmith.generate import TextDelta, cut_at_stop, generate, stream

PROMPTS = ["What was the revenue of Acme?", "hello", "The quick brown fox jumps over the lazy dog. Fine-tuning",
           "How many employees", "user assistant system hello world the answer is 42"]


def _ids(tok, texts=PROMPTS):
    return [tok(t)["input_ids"] for t in texts]


def _hf_single(model, tok, ids, n):
    """Reference: plain HF greedy generate on one unpadded prompt, no EOS stopping."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


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
    assert [c.ids for c in generate(model, tok, prompts, cfg.model_copy(update={"batch_size": 2}))] == [c.ids for c in batched]


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
    model, tok = tiny.gpt_neox(), tiny.tokenizer()
    it = stream(model, tok, _ids(tok)[0], GenerateConfig(max_new_tokens=400))
    next(it)
    it.close()  # joins the generation thread: returns only once generation stopped


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
    chat = Example(where="t:2", messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    for ex, template in ((qa, get_template("qa", "qa")), (chat, get_template("chat", "chat"))):
        (sample,) = render([ex], template, tok, max_length=512, truncation="prompt_left", rejects=rejects)
        n_prompt = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        assert render_prompt(ex, template, tok) == sample["input_ids"][:n_prompt]
        # and a served request (no answer yet) renders the same prompt
        request = Example(where="request", fields={"question": ex.fields["question"]}) if ex.fields else \
            Example(where="request", messages=ex.messages[:1])
        assert render_prompt(request, template, tok) == sample["input_ids"][:n_prompt]


def test_peft_wrapped_model_generates_like_merged():
    from peft import LoraConfig, get_peft_model

    tok = tiny.tokenizer()
    tok.eos_token = "<|im_start|>"
    base = tiny.gpt_neox()
    base.generation_config.eos_token_id = None
    torch.manual_seed(1)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["query_key_value", "dense_4h_to_h"],
                                           init_lora_weights=False)).eval()
    prompts = _ids(tok)
    cfg = GenerateConfig(max_new_tokens=8)
    wrapped = [c.ids for c in generate(peft, tok, prompts, cfg)]
    with peft.disable_adapter():
        plain = [c.ids for c in generate(peft, tok, prompts, cfg)]
    merged = peft.merge_and_unload()
    assert wrapped == [c.ids for c in generate(merged, tok, prompts, cfg)]
    assert plain != wrapped


def test_generate_cli_prompt_and_jsonl(tmp_path, capsys):
    import json

    from tunesmith.config import Config, UserError
    from tunesmith.generate import generate_cli, prompt_ids

    model_dir = tiny.save_model_dir(tmp_path / "m")
    cfg = Config(model={"name": str(model_dir)}, out_dir=str(tmp_path / "run"), generate={"max_new_tokens": 6})
    (one,) = generate_cli(cfg, "What was the revenue?", None, None)
    assert capsys.readouterr().out == one.text + "\n"
    src = tmp_path / "in.jsonl"
    src.write_text('{"question": "What was the revenue?"}\n{"prompt": "hello"}\n')
    generate_cli(cfg, None, str(src), str(tmp_path / "out.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model, tok = tiny.gpt_neox(), tiny.tokenizer()  # the same weights save_model_dir wrote
    model.generation_config.eos_token_id = tok.eos_token_id
    template = get_template("qa", "qa")
    want = generate(model, tok, [prompt_ids(template, tok, [{"role": "user", "content": q}]) for q in ("What was the revenue?", "hello")],
                    GenerateConfig(max_new_tokens=6))
    assert [r["answer"] for r in rows] == [w.text for w in want] and rows[0]["answer"] == one.text
    assert rows[1]["prompt"] == "hello" and rows[1]["completion_tokens"] == len(want[1].ids)
    src.write_text('{"nothing": 1}\n')
    with pytest.raises(UserError, match="in.jsonl:1"):
        generate_cli(cfg, None, str(src), None)
