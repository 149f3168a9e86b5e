"""Text metrics of an answer against its reference: exact match, token F1, ROUGE-L, BLEU, embeddings, numbers.

Everything here is a pure function of strings except the embedder (a loaded sentence-transformers model).
Loss/perplexity over answer tokens needs the model and is computed by the caller; `aggregate` folds it in.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass

from tunesmith.retrieve.embed import Embedder

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lowercase, punctuation -> space, drop a/an/the, collapse whitespace.

    Two deviations from SQuAD, both for numeric answers: thousands commas are removed ("1,234" -> "1234")
    and a '.' between digits is kept ("3.5" stays "3.5", not "35"), so 3.5 and 35 never compare equal.
    Apostrophes are deleted rather than spaced ("don't" -> "dont"), like SQuAD.

    >>> normalize_answer("The revenue was $1,234.5 Million!")
    'revenue was 1234.5 million'
    """
    s = _THOUSANDS.sub("", s.lower())
    out = []
    for i, ch in enumerate(s):
        if ch == "." and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit():
            out.append(ch)
        elif ch in "'\u2019":
            continue
        elif ch in string.punctuation or unicodedata.category(ch)[0] in "PS":
            out.append(" ")
        else:
            out.append(ch)
    return " ".join(_ARTICLES.sub(" ", "".join(out)).split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 over normalised words (multiset overlap); two empty strings score 1.0."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(preds: list[str], refs: list[str]) -> list[float]:
    """Per-pair ROUGE-L F-measure (rouge-score, Porter stemming), in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]


def bleu(preds: list[str], refs: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, 13a tokenisation), on sacrebleu's 0-100 scale."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(preds, [refs]).score)


def sentence_bleu(pred: str, ref: str) -> float:
    """Sentence BLEU (sacrebleu, exp smoothing), 0-100; noisy for short answers, so report corpus BLEU too."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(pred, [ref]).score)


# ---------------------------------------------------------------- embeddings


def embedding_similarity(embedder: Embedder, preds: list[str], refs: list[str]) -> list[float]:
    """Cosine similarity of each prediction's embedding with its reference's, in [-1, 1]."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    if not preds:
        return []
    emb = embedder.encode(list(preds) + list(refs))  # (2N, D), unit rows
    p, r = emb[: len(preds)], emb[len(preds) :]
    return [float(x) for x in (p * r).sum(axis=1)]


# ---------------------------------------------------------------- numbers

_SCALES = {
    "thousand": 1e3,
    "k": 1e3,
    "million": 1e6,
    "mn": 1e6,
    "m": 1e6,
    "billion": 1e9,
    "bn": 1e9,
    "b": 1e9,
    "trillion": 1e12,
}
# A number not glued to a word or another number on its left ("Q3", "v2" and "COVID-19"'s minus are not
# numbers/signs); an optional minus (ASCII or U+2212) before or after a currency sign; 1,234.5 or 1234.5 or
# .5; an optional % and an optional scale word ("million") or glued abbreviation ("34m", "2.1bn").
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212])?[$\u20ac\u00a3]?(?P<sign2>[-\u2212])?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<pct>\s?%)?"
    r"(?:\s?(?P<word>thousand|million|billion|trillion)\b|(?P<abbr>k|mn|m|bn|b)\b)?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Number:
    """A number found in text: its written value and its value after a scale word (34 million: 34, 3.4e7)."""

    raw: float
    value: float
    scaled: bool


def parse_numbers(text: str) -> list[Number]:
    """Every number in `text`, in order, with and without its scale word."""
    found = []
    for m in _NUMBER.finditer(text):
        raw = float(m["num"].replace(",", ""))
        if m["sign"] or m["sign2"]:
            raw = -raw
        scale_word = (m["word"] or m["abbr"] or "").lower()
        value = raw * _SCALES[scale_word] if scale_word else raw
        found.append(Number(raw=raw, value=value, scaled=bool(scale_word)))
    return found


def same_number(a: Number, b: Number) -> bool:
    """Equal values, or equal written numbers when at most one carries a scale word ("34" ~ "$34 million")."""
    if math.isclose(a.value, b.value, rel_tol=1e-9, abs_tol=1e-12):
        return True
    return not (a.scaled and b.scaled) and math.isclose(a.raw, b.raw, rel_tol=1e-9, abs_tol=1e-12)


def numeric_match(pred: str, ref_value: float | None, ref_text: str) -> bool:
    """True when the reference's number appears in the prediction (value equality after parsing).

    With `ref_value` that one number must appear; otherwise every number in `ref_text` must. A reference
    without numbers never matches (there is nothing to check).
    """
    got = parse_numbers(pred)
    if ref_value is not None:
        wanted = [Number(raw=float(ref_value), value=float(ref_value), scaled=False)]
    else:
        wanted = parse_numbers(ref_text)
    if not wanted:
        return False
    return all(any(same_number(g, w) for g in got) for w in wanted)


# ---------------------------------------------------------------- per-example rows and means


def question_overlap(pred: str, question: str) -> float:
    """Share of the prediction's normalised words that also occur in the question (0 for an empty answer)."""
    words = normalize_answer(pred).split()
    if not words:
        return 0.0
    in_question = set(normalize_answer(question).split())
    return sum(w in in_question for w in words) / len(words)


def score_examples(
    preds: list[str], refs: list[str], questions: list[str], embedder: Embedder | None
) -> list[dict]:
    """One dict of metrics per example; `embedding_sim` only with an embedder, `numeric_match` None
    when the reference has no number."""
    if not len(preds) == len(refs) == len(questions):
        raise ValueError(f"lengths differ: {len(preds)} preds, {len(refs)} refs, {len(questions)} questions")
    rouge = rouge_l(preds, refs)
    sims = embedding_similarity(embedder, preds, refs) if embedder is not None else None
    rows = []
    for i, (p, r, q) in enumerate(zip(preds, refs, questions, strict=True)):
        row = {
            "exact_match": exact_match(p, r),
            "token_f1": token_f1(p, r),
            "rouge_l": rouge[i],
            "bleu": sentence_bleu(p, r),
            "numeric_match": float(numeric_match(p, None, r)) if parse_numbers(r) else None,
            "question_overlap": question_overlap(p, q),
            "answer_words": len(p.split()),
        }
        if sims is not None:
            row["embedding_sim"] = sims[i]
        rows.append(row)
    return rows


def aggregate(rows: list[dict]) -> dict:
    """Mean of every numeric key over the rows that have it (None skipped), plus `n`.

    With per-example `loss` (mean answer-token loss) and `n_tokens`, loss is token-weighted and
    `perplexity` = exp(loss); without `n_tokens` it is the plain mean. `bleu` here is the mean sentence
    BLEU: callers add corpus BLEU from `bleu()` as `corpus_bleu`.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    out = {k: sums[k] / counts[k] for k in sums if k != "n_tokens"}
    with_tokens = [r for r in rows if r.get("loss") is not None and r.get("n_tokens")]
    if with_tokens and len(with_tokens) == counts.get("loss"):
        total = sum(r["n_tokens"] for r in with_tokens)
        out["loss"] = sum(r["loss"] * r["n_tokens"] for r in with_tokens) / total
    if "loss" in out:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))  # cap: exp(>50) is meaningless and overflows
    out["n"] = len(rows)
    return out
