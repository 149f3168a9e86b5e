"""Error buckets: a handful of named, per-example failure modes to count before and after fine-tuning.

An example can fall into several buckets. They are cheap heuristics meant to point a reader at examples to
look at, not a quality score; every threshold is a module constant so a report can state it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tunesmith.eval.metrics import normalize_answer, parse_numbers, question_overlap, same_number

BUCKETS = ("empty", "no_eos", "repetitive", "copies_question", "too_long", "wrong_number")

# Word n-grams used for the repetition ratio: 3-grams catch "the company the company the company" loops while
# ordinary prose rarely repeats a 3-gram in a short answer.
REPEAT_NGRAM = 3
# repeated share = 1 - distinct/total n-grams. A loop of one 3-word phrase said 4 times scores 1 - 3/10 = 0.7
# and tends to 1; answers of a few natural sentences score ~0. 0.3: almost a third of the answer is re-said.
REPEAT_RATIO = 0.3
# Below this many n-grams one repeat already moves the ratio a lot, so short answers are never "repetitive".
REPEAT_MIN_NGRAMS = 4
# Share of the answer's words that occur in the question. A real answer adds words the question lacks
# ("What was revenue in Q3?" -> "Revenue in Q3 was $34 million": 4/6 = 0.67); an echo adds almost none.
COPY_OVERLAP = 0.8
# ... and only when it overlaps the question clearly more than the reference answer does.
COPY_MARGIN = 0.1
# Echo check needs a few words: a one-word answer like "Revenue" legitimately reuses a question word.
COPY_MIN_WORDS = 3
# Answers longer than this many times the reference (in words) ramble: fine-tuning should fix the length.
TOO_LONG_RATIO = 2.5


def repeated_ngram_ratio(text: str, n: int = REPEAT_NGRAM) -> float:
    """1 - distinct/total word n-grams of the normalised text (0.0 when there are no n-grams)."""
    words = normalize_answer(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _has_wrong_number(pred: str, ref: str) -> bool:
    """The reference has numbers and the prediction states one that is none of them."""
    ref_numbers = parse_numbers(ref)
    if not ref_numbers:
        return False
    return any(not any(same_number(p, r) for r in ref_numbers) for p in parse_numbers(pred))


def buckets(pred: str, ref: str, question: str, hit_max_tokens: bool) -> list[str]:
    """Names of the failure modes of one answer, in `BUCKETS` order (empty list: none found).

    >>> buckets("", "42", "What is it?", hit_max_tokens=False)
    ['empty']
    """
    if not pred.strip():
        return ["empty", "no_eos"] if hit_max_tokens else ["empty"]
    found = []
    if hit_max_tokens:
        found.append("no_eos")
    words = len(normalize_answer(pred).split())
    grams = words - REPEAT_NGRAM + 1
    if grams >= REPEAT_MIN_NGRAMS and repeated_ngram_ratio(pred) > REPEAT_RATIO:
        found.append("repetitive")
    # Many datasets' references restate the question ("Revenue in Q3 was $34M."): an answer only counts as a
    # copy when it leans on the question clearly more than the reference itself does.
    overlap = question_overlap(pred, question)
    if (
        words >= COPY_MIN_WORDS
        and overlap >= COPY_OVERLAP
        and overlap > question_overlap(ref, question) + COPY_MARGIN
    ):
        found.append("copies_question")
    ref_words = len(ref.split())
    if ref_words and len(pred.split()) > TOO_LONG_RATIO * ref_words:
        found.append("too_long")
    if _has_wrong_number(pred, ref):
        found.append("wrong_number")
    return found


def bucket_counts(rows: Iterable[list[str]]) -> dict[str, int]:
    """How many examples fall in each bucket (every bucket listed, zeros included)."""
    counts = dict.fromkeys(BUCKETS, 0)
    for names in rows:
        for name in set(names):
            counts[name] = counts.get(name, 0) + 1
    return counts
