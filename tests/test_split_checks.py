"""Split stability and the data checks (exact/near duplicates, leakage, length outliers), hand-computed."""

from __future__ import annotations

import random

import pytest

from tunesmith.config import UserError
from tunesmith.data import checks
from tunesmith.data.checks import (
    Duplicate,
    exact_duplicates,
    histogram,
    jaccard,
    leakage,
    length_stats,
    near_duplicates,
    shingles,
)
from tunesmith.data.formats import Example, prompt_key
from tunesmith.data.split import normalize_text, split, split_hash


def qa(i, q, a="answer"):
    return Example(where=f"f.jsonl:{i}", fields={"question": q, "answer": a})


def many(n, start=0):
    return [qa(i, f"question number {i} about topic {i % 7}") for i in range(start, start + n)]


def test_normalize_text():
    assert normalize_text("  What's   the Q3\trevenue?\n") == "whats the q3 revenue"
    assert normalize_text("Hello, World!") == normalize_text("hello world")
    assert normalize_text("ＡＢＣ") == "abc"  # NFKC folds full-width letters


def test_split_is_deterministic_and_seeded():
    ex = many(200)
    a = split(ex, 0.2, 7, prompt_key)
    assert a == split(ex, 0.2, 7, prompt_key)
    assert a[1] != split(ex, 0.2, 8, prompt_key)[1]
    assert len(a[0]) + len(a[1]) == 200
    assert [e.where for e in a[0]] == sorted(
        (e.where for e in a[0]), key=lambda w: int(w.split(":")[1])
    )  # order kept


def test_split_fraction_is_stable_when_rows_are_added():
    base = many(300)
    train, test = split(base, 0.2, 1, prompt_key)
    train2, test2 = split(base + many(300, start=300), 0.2, 1, prompt_key)
    old = {e.where for e in base}
    assert {e.where for e in test2 if e.where in old} == {e.where for e in test}
    assert {e.where for e in train2 if e.where in old} == {e.where for e in train}
    assert 30 <= len(test) <= 90  # 20% of 300 = 60, binomial sd ~7


def test_split_side_is_decided_by_hash_below_fraction():
    ex = many(50)
    _, test = split(ex, 0.3, 3, prompt_key)
    assert {e.where for e in test} == {e.where for e in ex if split_hash(prompt_key(e), 3) < 0.3 * 2**64}


def test_same_normalized_prompt_same_side():
    ex = many(100) + [qa(1000 + i, f"QUESTION number {i}, about topic {i % 7}!") for i in range(100)]
    train, test = split(ex, 0.25, 5, prompt_key)
    test_keys = {normalize_text(e.fields["question"]) for e in test}
    assert not test_keys & {normalize_text(e.fields["question"]) for e in train}
    assert len(test) % 2 == 0  # every prompt comes in a pair


def test_split_count_takes_the_smallest_hashes():
    ex = many(40)
    train, test = split(ex, 5, 9, prompt_key)
    assert len(test) == 5 and len(train) == 35
    smallest = sorted(ex, key=lambda e: split_hash(prompt_key(e), 9))[:5]
    assert {e.where for e in test} == {e.where for e in smallest}


def test_split_edge_cases():
    ex = many(10)
    assert split(ex, 0, 1, prompt_key) == (ex, [])
    with pytest.raises(UserError, match="data.test_size=10 would leave no training examples"):
        split(ex, 10, 1, prompt_key)
    train, test = split(many(3), 0.01, 1, prompt_key)  # tiny data: still hold one example out
    assert len(test) == 1 and len(train) == 2


def test_exact_duplicates_after_normalization():
    ex = [
        qa(1, "What is X?", "It is Y."),
        qa(2, "what is x", "it is y"),
        qa(3, "What is X?", "Different."),
        qa(4, "WHAT IS X", "IT IS Y!"),
    ]
    assert exact_duplicates(ex) == [Duplicate("f.jsonl:2", "f.jsonl:1"), Duplicate("f.jsonl:4", "f.jsonl:1")]


def test_shingles_and_jaccard():
    assert len(shingles("a b c d e")) == 3  # abc, bcd, cde
    assert len(shingles("Hi there")) == 1  # shorter than 3 words: one shingle
    assert shingles("") == set()
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5


def test_near_duplicates_found_with_similarity_and_exact_ones_excluded():
    words = [f"word{i}" for i in range(20)]
    a = " ".join(words)
    b = " ".join(words[:-1] + ["changed"])  # 18 shingles each, 17 shared, union 19 -> 17/19
    ex = [
        qa(1, a, "x"),
        qa(2, "something else entirely about cats and dogs", "x"),
        qa(3, b, "x"),
        qa(4, a, "x"),
    ]
    found = near_duplicates(ex, key=lambda e: e.fields["question"])
    assert found == [Duplicate("f.jsonl:3", "f.jsonl:1", round(17 / 19, 3))]
    assert near_duplicates(ex, key=lambda e: e.fields["question"], threshold=0.95) == []


def test_leakage_exact_and_near_only_across_splits():
    words = " ".join(f"w{i}" for i in range(12))
    train = [qa(1, "How big is the sun?"), qa(2, words), qa(3, "How big is the sun?")]
    test = [qa(10, "how BIG is the sun"), qa(11, words + " w99"), qa(12, "Unrelated question here")]
    # 10 shingles vs 11 shingles, 10 shared -> 10/11
    assert leakage(train, test) == [
        Duplicate("f.jsonl:10", "f.jsonl:1", 1.0),
        Duplicate("f.jsonl:11", "f.jsonl:2", round(10 / 11, 3)),
    ]


def test_leakage_keeps_the_closest_train_row():
    words = " ".join(f"w{i}" for i in range(12))
    train = [qa(1, words), qa(2, words + " w99 w98")]
    # test: 11 shingles; row 1 shares 10 of 11 (10/11), row 2 shares 11 of 12 (11/12)
    assert leakage(train, [qa(10, words + " w99")]) == [
        Duplicate("f.jsonl:10", "f.jsonl:2", round(11 / 12, 3))
    ]


def test_near_duplicates_scale_without_all_pairs(monkeypatch):
    # counted, not timed: all pairs of n rows is n(n-1)/2 similarity computations; LSH computes only
    # candidates'
    compared = []
    exact = checks.jaccard
    monkeypatch.setattr(checks, "jaccard", lambda a, b: compared.append(1) or exact(a, b))
    rng = random.Random(0)
    vocab = [f"v{i}" for i in range(5000)]
    n = 4000
    ex = [qa(i, " ".join(rng.choices(vocab, k=12)), " ".join(rng.choices(vocab, k=25))) for i in range(n)]
    ex[n - 1] = qa(n - 1, ex[123].fields["question"], ex[123].fields["answer"] + " plus")
    found = near_duplicates(ex)
    assert [(d.where, d.of) for d in found] == [(f"f.jsonl:{n - 1}", "f.jsonl:123")]
    assert len(compared) <= n  # 1 here; all pairs would be ~8e6
    # a crowded corpus (every row near every other) stays linear too: per band, each row meets at most 8
    # earlier rows
    base = " ".join(f"w{i}" for i in range(40))
    crowd = [qa(i, f"{base} tail{i}") for i in range(1000)]
    compared.clear()
    assert len(near_duplicates(crowd)) > 900
    assert len(compared) <= 16 * 8 * len(crowd) < len(crowd) * (len(crowd) - 1) // 2


def test_length_stats_hand_computed():
    s = length_stats(list(range(1, 101)), max_length=64, wheres=[f"r{i}" for i in range(1, 101)], top=3)
    # numpy linear percentiles of 1..100: p50 = 50.5 -> 51, p90 = 90.1 -> 91, p99 = 99.01 -> 100
    assert (s.count, s.mean, s.p50, s.p90, s.p99, s.max) == (100, 50.5, 51, 91, 100, 100)
    assert (s.over_max, s.share_truncated, s.suggested_max_length) == (36, 0.36, 128)
    assert s.outliers == [("r100", 100), ("r99", 99), ("r98", 98)] and s.n_outliers == 36  # all > 64
    s = length_stats([10] * 99 + [500], max_length=512)
    assert (s.p99, s.over_max, s.suggested_max_length, s.outliers) == (15, 0, 32, [("#99", 500)])


def test_histogram_counts():
    bins = histogram([1, 2, 3, 4, 10], bins=3)  # 10 values 1..10 in 3 bins: width ceil(10/3) = 4
    assert bins == [(1, 5, 4), (5, 9, 0), (9, 13, 1)]
    assert histogram([7, 7, 7], bins=2) == [(7, 8, 3)]  # never bins past the max
    assert histogram([]) == []


def test_near_duplicate_recall_at_jaccard_090():
    # 200 pairs of 60-word texts, each partner with one word changed: Jaccard 0.90-0.95 on 3-word shingles,
    # where 16 bands of 4 rows make a pair a candidate with p > 0.9999. The old linear hash family
    # (correlated "permutations") found 188 of these 200 pairs.
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(5000)]
    texts = []
    for _ in range(200):
        words = [rng.choice(vocab) for _ in range(60)]
        other = list(words)
        other[rng.randrange(60)] = rng.choice(vocab)
        texts += [" ".join(words), " ".join(other)]
    sets = [shingles(t) for t in texts]
    pairs = checks.candidate_pairs(sets)
    found = sum((2 * i, 2 * i + 1) in pairs for i in range(200))
    assert min(jaccard(sets[2 * i], sets[2 * i + 1]) for i in range(200)) > 0.89
    assert found >= 198, found
