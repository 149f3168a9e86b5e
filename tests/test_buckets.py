"""Each error bucket on a hand-made example, its threshold edges, and the counts."""

from __future__ import annotations

import pytest

from tunesmith.eval.buckets import (
    BUCKETS,
    COPY_OVERLAP,
    REPEAT_RATIO,
    TOO_LONG_RATIO,
    bucket_counts,
    buckets,
    repeated_ngram_ratio,
)

Q = "What was revenue in Q3?"
REF = "Revenue in Q3 was $34 million."


def test_a_good_answer_is_in_no_bucket():
    assert buckets("Q3 revenue came in at 34 million dollars.", REF, Q, hit_max_tokens=False) == []


def test_empty_and_no_eos():
    assert buckets("   \n", REF, Q, hit_max_tokens=False) == ["empty"]
    assert buckets("", REF, Q, hit_max_tokens=True) == ["empty", "no_eos"]
    assert buckets("Revenue was 34 million", REF, Q, hit_max_tokens=True) == ["no_eos"]


def test_repetitive():
    # "sales grew fast" x 4: 10 word 3-grams, 3 distinct -> 1 - 3/10 = 0.7
    loop = "sales grew fast " * 4
    assert repeated_ngram_ratio(loop) == pytest.approx(0.7)
    assert "repetitive" in buckets(loop, "sales grew fast and then slowed down a lot over the year", Q, False)
    # normalised to 9 words ("the" dropped): 7 3-grams, "sales grew fast" twice -> 1 - 6/7 ~= 0.14, under
    once = "sales grew fast in the year and sales grew fast"
    assert (
        repeated_ngram_ratio(once) == pytest.approx(1 - 6 / 7) and repeated_ngram_ratio(once) < REPEAT_RATIO
    )
    assert "repetitive" not in buckets(once, REF, Q, False)
    # too short to judge: "x x x x" has only 2 3-grams
    assert "repetitive" not in buckets("x x x x", "x x x x", Q, False)


def test_copies_question():
    assert buckets("What was revenue in Q3?", REF, Q, False) == ["copies_question"]
    # the real answer reuses 4 of its 6 words from the question: 0.67 < COPY_OVERLAP
    assert COPY_OVERLAP > 4 / 6
    assert "copies_question" not in buckets(REF, REF, Q, False)
    assert "copies_question" not in buckets("Revenue", "Revenue", Q, False)  # one word: too short to call


def test_too_long():
    ref = "four words right here"  # 4 words -> limit 10 words
    assert TOO_LONG_RATIO == 2.5
    assert "too_long" not in buckets(" ".join(f"w{i}" for i in range(10)), ref, "q", False)
    assert "too_long" in buckets(" ".join(f"w{i}" for i in range(11)), ref, "q", False)


def test_wrong_number():
    assert buckets("Revenue was $35 million.", REF, Q, False) == ["wrong_number"]
    assert "wrong_number" not in buckets("Revenue was 34 million.", REF, Q, False)
    assert "wrong_number" not in buckets("Revenue was high.", REF, Q, False)  # no number stated: not wrong
    assert "wrong_number" not in buckets("It was 12 things.", "Nothing numeric.", "q", False)  # ref has none


def test_bucket_counts_lists_every_bucket():
    counts = bucket_counts([["empty", "no_eos"], [], ["no_eos", "no_eos"], ["wrong_number"]])
    assert list(counts) == list(BUCKETS)
    assert counts == {
        "empty": 1,
        "no_eos": 2,
        "repetitive": 0,
        "copies_question": 0,
        "too_long": 0,
        "wrong_number": 1,
    }


def test_copy_is_judged_against_a_reference_that_restates_the_question():
    q = "What was the adjusted EBITDA for Green Dot in Q3 2020"
    ref = "The adjusted EBITDA for Green Dot in Q3 2020 was $34 million."
    # same shape as the reference: not a copy, even though most words come from the question
    assert "copies_question" not in buckets(
        "The adjusted EBITDA for Green Dot in Q3 2020 was $12 million.", ref, q, False
    )
    # pure echo of the question with a short reference: a copy
    assert "copies_question" in buckets(
        "What was the adjusted EBITDA for Green Dot in Q3 2020", "$34 million.", q, False
    )
