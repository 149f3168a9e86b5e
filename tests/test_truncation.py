"""Truncation at data.max_length keeps what inference sees: the template's fixed parts stay, user content is
cut.

The expectations use only render and render_prompt: a cut sample's prompt must be exactly what
render_prompt gives for the example with its user content cut, so the model trains on contexts it will get.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import tiny
from tunesmith.data.formats import ALPACA_INPUT, Example, get_template
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, render, render_prompt
from tunesmith.data.truncate import Cut, smallest_fitting

SYSTEM = "You are a helpful analyst."
LONG = "What was the revenue of Acme in Q3 2020? " * 8
ANSWER = "The revenue was 42 percent."
CHAT, QA = get_template("chat", "chat"), get_template("qa", "qa")
TOK = tiny.tokenizer()


def one(ex, template, max_length, truncation="prompt_left"):
    [s] = render([ex], template, TOK, max_length, truncation, Rejects("fail"))
    return s


def split(sample):
    """(prompt ids, learned ids): the leading run of -100 labels is the prompt."""
    n = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE)
    return sample["input_ids"][:n], sample["input_ids"][n:]


def chat(*turns, system=SYSTEM):
    roles = ["user", "assistant"] * len(turns)
    return Example(
        "c.jsonl:1",
        messages=[{"role": "system", "content": system}] * bool(system)
        + [{"role": r, "content": c} for r, c in zip(roles, turns)],
    )


def user_content(prompt_ids, turn=-1):
    """The text of a user turn in a decoded ChatML prompt."""
    return TOK.decode(prompt_ids).split("<|im_start|>user\n")[turn].split("<eos>\n")[0]


def test_chat_cut_keeps_system_prompt_markers_and_response():
    ex = chat(LONG, ANSWER)
    whole = one(ex, CHAT, 10_000)
    s = one(ex, CHAT, 60)
    assert len(whole["input_ids"]) > 60 and len(s["input_ids"]) == 60
    prompt, learned = split(s)
    assert learned == split(whole)[1]  # the full response + end of turn + EOS
    text = TOK.decode(prompt)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<eos>\n<|im_start|>user\n")
    assert text.endswith("<eos>\n<|im_start|>assistant\n") and text.count("<|im_start|>") == 3
    kept = user_content(prompt)
    assert kept and LONG.endswith(kept) and len(kept) < len(LONG)  # the question lost its head
    cut = chat(kept, ANSWER)
    assert prompt == render_prompt(cut, CHAT, TOK)  # what inference renders for the cut conversation


def test_qa_cut_keeps_the_templates_fixed_text():
    ex = Example("q.jsonl:1", {"question": LONG, "answer": ANSWER})
    s = one(ex, QA, 40)
    assert len(s["input_ids"]) == 40
    prompt, learned = split(s)
    assert learned == TOK(ANSWER, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    text = TOK.decode(prompt)
    assert text.startswith("### Question:\n") and text.endswith("\n\n### Answer:\n")
    kept = text[len("### Question:\n") : -len("\n\n### Answer:\n")]
    assert kept and LONG.endswith(kept) and len(kept) < len(LONG)
    assert prompt == render_prompt(Example("q.jsonl:1", {"question": kept, "answer": ANSWER}), QA, TOK)


def test_chat_history_is_cut_oldest_first():
    last = "How many employees does the company have?"
    ex = chat(LONG, "It was 42 percent.", last, "The company has 1,200 employees.")
    whole, s = one(ex, CHAT, 10_000), one(ex, CHAT, 90)
    assert len(s["input_ids"]) == 90
    assert [i for i, lab in zip(s["input_ids"], s["labels"]) if lab != IGNORE] == [
        i for i, lab in zip(whole["input_ids"], whole["labels"]) if lab != IGNORE
    ]  # both answers learned whole
    text = TOK.decode(s["input_ids"])
    assert f"<|im_start|>user\n{last}<eos>\n" in text  # the newest question is intact
    first = text.split("<|im_start|>user\n")[1].split("<eos>\n")[0]
    assert len(first) < len(LONG) and LONG.endswith(first)


def test_alpaca_cuts_the_longest_value_and_keeps_the_fixed_text():
    t = get_template("alpaca", "alpaca")
    ex = Example("a.jsonl:1", {"instruction": "Summarize the call.", "input": LONG, "output": ANSWER})
    whole, s = one(ex, t, 10_000), one(ex, t, len(one(ex, t, 10_000)["input_ids"]) - 30)
    assert len(s["input_ids"]) == len(whole["input_ids"]) - 30
    text = TOK.decode(split(s)[0])
    head, tail = ALPACA_INPUT.format(instruction="Summarize the call.", input="\0").split("\0")
    assert text.startswith(head) and text.endswith(
        tail
    )  # "Below is an instruction ... ### Input:\n" kept whole
    kept = text[len(head) : -len(tail)]
    assert LONG.endswith(kept) and len(kept) < len(LONG)


def test_cuts_are_recorded_with_the_part_that_lost_tokens():
    ex = Example("q.jsonl:1", {"question": LONG, "answer": ANSWER})
    n = len(one(ex, QA, 10_000)["input_ids"])
    cuts: list[Cut] = []
    render([ex], QA, TOK, 40, "prompt_left", Rejects("fail"), cuts)  # content cut
    render(
        [ex], QA, TOK, 14, "prompt_left", Rejects("fail"), cuts
    )  # fixed text + response do not fit: token cut
    render([ex], QA, TOK, n - 3, "right", Rejects("fail"), cuts)  # the response's end goes
    render([ex], QA, TOK, n, "prompt_left", Rejects("fail"), cuts)  # fits: no cut
    assert [(c.part, c.length) for c in cuts] == [("user content", n), ("prompt", n), ("response", n)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_left_and_right_stay_token_cuts(side):
    ex = chat(LONG, ANSWER)
    whole = one(ex, CHAT, 10_000)["input_ids"]
    n = (
        60 if side == "left" else len(whole) - 3
    )  # left: the system prompt goes; right: the EOS and answer's end
    assert one(ex, CHAT, n, side)["input_ids"] == (whole[-n:] if side == "left" else whole[:n])


def test_fixed_parts_that_do_not_fit_fall_back_to_the_token_cut():
    ex = chat(LONG, ANSWER, system="You are a helpful analyst. " * 10)
    whole = one(ex, CHAT, 10_000)
    s = one(ex, CHAT, 30)  # the system prompt alone is longer than 30 tokens
    assert s["input_ids"] == whole["input_ids"][-30:] and split(s)[1] == split(whole)[1]


WORDS = [
    "What",
    " was",
    " the",
    " revenue",
    " of",
    " Acme",
    "?",
    " 42",
    " percent",
    "\n",
    "  ",
    " employees",
    ".",
]


@settings(max_examples=50, deadline=None)
@given(
    q=st.lists(st.sampled_from(WORDS), min_size=1, max_size=60),
    a=st.lists(st.sampled_from(WORDS), min_size=1, max_size=20),
    system=st.sampled_from(["", SYSTEM]),
    max_length=st.integers(2, 120),
    as_chat=st.booleans(),
)
def test_never_longer_than_max_length_and_fixed_parts_kept_when_they_fit(q, a, system, max_length, as_chat):
    question, answer = "x" + "".join(q), "y" + "".join(a)  # non-empty values, as to_example guarantees
    if as_chat:
        ex, t = chat(question, answer, system=system), CHAT
        head = (f"<|im_start|>system\n{system}<eos>\n" if system else "") + "<|im_start|>user\n"
        tail, minimal = "<eos>\n<|im_start|>assistant\n", chat("", answer, system=system)
    else:
        ex, t = Example("q:1", {"question": question, "answer": answer}), QA
        head, tail = "### Question:\n", "\n\n### Answer:\n"
        minimal = Example("q:1", {"question": question[len(question.rstrip()) - 1 :], "answer": answer})
    samples = render([ex], t, TOK, max_length, "prompt_left", Rejects("skip"))
    if not samples:  # nothing learned survives: reported as a bad row
        return
    [s] = samples
    whole = one(ex, t, 10_000)
    assert len(s["input_ids"]) <= max_length
    if len(whole["input_ids"]) <= max_length:
        assert s == whole
    elif len(one(minimal, t, 10_000)["input_ids"]) <= max_length:  # the fixed parts + the response fit
        prompt, learned = split(s)
        assert learned == split(whole)[1]
        text = TOK.decode(prompt)
        assert text.startswith(head) and text.endswith(tail)
        kept = text[len(head) : -len(tail)]
        assert question.endswith(kept)
        cut = (
            chat(kept, answer, system=system)
            if as_chat
            else Example("q:1", {"question": kept, "answer": answer})
        )
        assert prompt == render_prompt(cut, t, TOK)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=80),
    budget=st.integers(0, 30),
    guess=st.integers(-5, 100),
    monotone=st.booleans(),
)
def test_search_finds_a_fitting_boundary(lengths, budget, guess, monotone):
    # lengths[c]: the tokens left after cutting c characters; lengths[0] is the over-long example
    lengths = [max(budget + 1, lengths[0])] + (sorted(lengths[1:], reverse=True) if monotone else lengths[1:])
    probes = []

    def fits(c):
        probes.append(c)
        return lengths[c] <= budget

    c = smallest_fitting(fits, len(lengths) - 1, guess)
    if c is None:
        assert lengths[-1] > budget and len(lengths) - 1 in probes
    else:
        assert 0 < c < len(lengths) and lengths[c] <= budget < lengths[c - 1]
        if monotone:
            assert c == min(i for i, n in enumerate(lengths) if n <= budget)


def test_inspect_counts_cuts_per_part_and_warns_with_the_length_needed(tmp_path):
    import json

    from rich.console import Console

    from tunesmith.config import load_config
    from tunesmith.data.inspect import inspect_data, print_inspect

    rows = [
        {"question": f"What was the revenue of company {i}?", "answer": "It was 42 percent."}
        for i in range(30)
    ]
    rows += [
        {"question": LONG + str(i), "answer": ANSWER} for i in range(3)
    ]  # 3 of 33 over max_length: 9% > 2%
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.path={tmp_path / 'd.jsonl'}", "data.test_size=0", "data.max_length=48"])
    report = inspect_data(cfg, TOK, None)
    cut = report["cut"]
    longest = max(len(one(Example("x", r), QA, 10_000)["input_ids"]) for r in rows)
    assert (cut["examples"], cut["parts"]["user content"], cut["max"]) == (3, 3, longest)
    assert {c["where"] for c in cut["first"]} == {f"{tmp_path / 'd.jsonl'}:{i}" for i in (31, 32, 33)}
    assert "3 of 33 examples (9.1%) are cut at data.max_length=48" in cut["warning"]
    assert f"to {longest} (+{longest - 48}) to keep all whole" in cut["warning"]
    console = Console(record=True, width=400)
    print_inspect(report, TOK, console)
    out = console.export_text()
    assert "warning: 3 of 33 examples" in out and "cut at max_length=48: 3 examples (9.1%" in out
    report = inspect_data(
        load_config(None, [f"data.path={tmp_path / 'd.jsonl'}", "data.test_size=0", "data.max_length=4096"]),
        TOK,
        None,
    )
    assert report["cut"]["examples"] == 0 and report["cut"]["warning"] is None
