"""render (masks, EOS, truncation) and pack (boundaries, isolation) with hand-computable expectations."""

import pytest
import torch

from tests import tiny
from tunesmith.config import UserError
from tunesmith.data.formats import ALPACA_NO_INPUT, Example, get_template, prompt_text, to_example
from tunesmith.data.pack import collate_packed, collate_padded, epoch_batches, pack
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, render, render_prompt
from tunesmith.data.row import Row
from tunesmith.data.truncate import truncate


def qa(q="What was the revenue?", a="The revenue was 42 percent.", where="t.jsonl:1"):
    return Example(where=where, fields={"question": q, "answer": a})


def test_qa_mask_prompt_ignored_response_and_eos_learned(tok):
    t = get_template("qa", "qa")
    [s] = render([qa()], t, tok, 512, "prompt_left", Rejects("fail", None))
    p = tok("### Question:\nWhat was the revenue?\n\n### Answer:\n")["input_ids"]
    r = tok("The revenue was 42 percent.", add_special_tokens=False)["input_ids"]
    assert s["input_ids"] == p + r + [tok.eos_token_id]
    assert s["labels"] == [IGNORE] * len(p) + r + [tok.eos_token_id]


def test_eos_learned_when_pad_equals_eos():
    tok = tiny.tokenizer(pad=False)
    tok.pad_token = tok.eos_token  # the common pythia/llama setup
    [s] = render([qa()], get_template("qa", "qa"), tok, 512, "right", Rejects("fail", None))
    assert s["labels"][-1] == tok.eos_token_id == tok.pad_token_id
    batch = collate_padded(
        [s, {**s, "input_ids": s["input_ids"][:3], "labels": s["labels"][:3]}], [[0], [1]], tok.pad_token_id
    )
    # padding is masked by position: the real EOS of row 0 keeps its label, row 1's pads do not.
    assert batch["labels"][0, len(s["labels"]) - 1] == tok.eos_token_id
    assert (batch["labels"][1, 3:] == IGNORE).all() and (batch["attention_mask"][1, 3:] == 0).all()


@pytest.mark.parametrize(
    "side,expected",
    [("right", ([1, 2, 3], [4])), ("left", ([3], [4, 5, 6])), ("prompt_left", ([3], [4, 5, 6]))],
)
def test_truncate_sides(side, expected):
    assert truncate([1, 2, 3], [4, 5, 6], 4, side) == expected


def test_truncate_response_longer_than_max():
    assert truncate([1, 2], [3, 4, 5, 6], 3, "prompt_left") == ([], [3, 4, 5])
    assert truncate([1, 2], [3, 4, 5, 6], 3, "left") == ([], [4, 5, 6])
    assert truncate([1, 2, 3, 4], [5], 3, "right") == ([1, 2, 3], [])


def test_no_response_survives_is_a_bad_row(tok, tmp_path):
    long_q = "What was the revenue? " * 20
    with pytest.raises(
        UserError, match=r"t.jsonl:1: .*no response token survives truncation at data.max_length=8"
    ):
        render([qa(q=long_q)], get_template("qa", "qa"), tok, 8, "right", Rejects("fail", None))
    rej = Rejects("skip", tmp_path)
    assert render([qa(q=long_q)], get_template("qa", "qa"), tok, 8, "right", rej) == []
    assert rej.count == 1


def test_alpaca_picks_prompt_by_input():
    t = get_template("alpaca", "alpaca")
    with_input = Example("a:1", {"instruction": "Sum", "input": "1 2", "output": "3"})
    without = Example("a:2", {"instruction": "Say hi", "input": "  ", "output": "hi"})
    assert "### Input:\n1 2\n\n### Response:\n" in prompt_text(with_input, t)
    assert prompt_text(without, t) == ALPACA_NO_INPUT.format(instruction="Say hi")


def test_user_template_and_missing_field(tok):
    t = get_template("Q: {question} ({ticker})\nA: ", "qa")
    ex = Example("f:3", {"question": "Rev?", "answer": "1", "ticker": "ACME"})
    assert prompt_text(ex, t) == "Q: Rev? (ACME)\nA: "
    with pytest.raises(UserError, match=r"f:4: template needs field 'ticker'"):
        prompt_text(Example("f:4", {"question": "Rev?", "answer": "1"}), t)


@pytest.mark.parametrize(
    "fields,msg",
    [
        ({"question": "q"}, "missing field 'answer'"),
        ({"question": "q", "answer": "  "}, "field 'answer' is empty"),
        ({"question": "q", "answer": 3}, "field 'answer' must be a string"),
    ],
)
def test_field_validation(fields, msg):
    with pytest.raises(UserError, match=f"x.jsonl:7: {msg}"):
        to_example(Row("x.jsonl:7", fields), "qa", Rejects("fail", None))


def test_chat_loss_only_on_assistant_turns(tok):
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the answer"},
        {"role": "user", "content": "world"},
        {"role": "assistant", "content": "is 42"},
    ]
    ex = to_example(Row("c:1", {"messages": msgs}), "chat", Rejects("fail", None))
    [s] = render([ex], get_template("chat", "chat"), tok, 512, "prompt_left", Rejects("fail", None))
    learned = tok.decode([i for i, lab in zip(s["input_ids"], s["labels"]) if lab != IGNORE])
    assert learned == "the answer<eos>\nis 42<eos>\n"
    # inference prompt == training prompt prefix (the round trip generation relies on)
    first = Example("c:1", messages=msgs[:2])
    prompt = render_prompt(first, get_template("chat", "chat"), tok)
    assert s["input_ids"][: len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_text_format_blocks_all_tokens_learned(tok):
    doc = Example("d.txt", {"text": "The quick brown fox jumps over the lazy dog. " * 4})
    samples = render([doc], get_template("text", "text"), tok, 16, "right", Rejects("fail", None))
    ids = tok(doc.fields["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [i for s in samples for i in s["input_ids"]] == ids
    assert all(s["labels"] == s["input_ids"] and len(s["input_ids"]) <= 16 for s in samples)


def test_pack_best_fit_decreasing():
    assert pack([5, 3, 2, 4], 8) == [[0, 1], [3, 2]]
    bins = pack([7, 1, 6, 2, 5, 3, 4, 4], 8)
    assert sorted(sum([7, 1, 6, 2, 5, 3, 4, 4][i] for i in b) for b in bins) == [8, 8, 8, 8]
    with pytest.raises(ValueError):
        pack([9], 8)


def test_collate_packed_positions_restart():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    b = collate_packed(samples, [[0, 1], [1]], pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]] and b["real_tokens"] == 7
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, 8, 9], [8, 9, -100, -100, -100]]


def test_epoch_batches_deterministic_and_complete():
    lengths = [3, 5, 2, 7, 1, 4, 6, 2]
    a = epoch_batches(lengths, 2, 8, True, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 2, 8, True, seed=1, epoch=0)
    assert sorted(i for batch in a for row in batch for i in row) == list(range(8))
    assert a != epoch_batches(lengths, 2, 8, True, seed=1, epoch=1) or len(a) == 1


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_one_by_one(tok, arch, attn):
    model = (tiny.gpt_neox if arch == "gpt_neox" else tiny.llama)(attn_implementation=attn)
    texts = [
        ("What was the revenue?", "It was 42 percent."),
        ("How many employees?", "1,200 employees."),
        ("hello", "world the answer is 42"),
    ]
    exs = [qa(q, a, f"t:{i}") for i, (q, a) in enumerate(texts)]
    samples = render(exs, get_template("qa", "qa"), tok, 512, "right", Rejects("fail", None))
    batch = collate_packed(samples, [[0, 1, 2]], tok.pad_token_id)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        t = 0
        for s in samples:
            n = len(s["input_ids"])
            alone = model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[t : t + n], alone, atol=1e-5, rtol=1e-5)
            t += n


def test_packing_without_position_restart_leaks(tok):
    # Guard that the parity test above can fail: plain positions let sample 2 attend to sample 1.
    model = tiny.llama()
    samples = render(
        [qa(where="a"), qa("hello", "world", "b")],
        get_template("qa", "qa"),
        tok,
        512,
        "right",
        Rejects("fail", None),
    )
    batch = collate_packed(samples, [[0, 1]], tok.pad_token_id)
    n0 = len(samples[0]["input_ids"])
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, n0:]
        alone = model(input_ids=torch.tensor([samples[1]["input_ids"]]), use_cache=False).logits[0]
    assert (leaky - alone).abs().max() > 1e-3
