"""Generator output -> QA pairs, and the filters that decide which pairs are kept.

Parsing accepts JSON (array, object, fenced, truncated) or Q:/A: lines; `verdict` names the filter that drops
a pair (length, grounding, echo, duplicate, leakage) or says 'kept'. `FILTERS` is every reason a run reports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tunesmith.config import SynthConfig
from tunesmith.data.checks import jaccard, shingles
from tunesmith.data.documents import Chunk
from tunesmith.data.split import normalize_text

NEAR_DUPLICATE = 0.8  # Jaccard of word 3-grams above which two questions are "the same question"
_STOPWORDS = (
    "a an the of to in on at for by with and or but is are was were be been it its this that these those as "
    "from which who what when where how why do does did not no can will would should may might has have had"
)
_STOP = frozenset(_STOPWORDS.split())
# why a pair or a chunk's output is dropped: "malformed" (no pair parsed, after retries), then verdict's
# filters
FILTERS = ("malformed", "length", "grounding", "echo", "duplicate", "leakage")


# ---- parsing ----


def drop_cut_line(text: str) -> str:
    """Q:/A: output cut by max_new_tokens -> without its last, unfinished line (so no half answer is kept).

    >>> drop_cut_line("Q: Who?\\nA: Ada.\\nQ: When?\\nA: In 18")
    'Q: Who?\\nA: Ada.\\nQ: When?'
    """
    return text[: text.rfind("\n")] if "\n" in text else text


_QA_LINE = re.compile(
    r"^\s*(?:[-*]\s*|\d+[.)]\s*)?\**(Q|Question|A|Answer)\**\s*\d*\s*[:：]\**\s*(.*)$", re.IGNORECASE
)


def _pair(obj: object) -> dict | None:
    if not isinstance(obj, dict):
        return None
    low = {str(k).lower(): v for k, v in obj.items()}
    q, a = low.get("question", low.get("q")), low.get("answer", low.get("a"))
    return {"question": q.strip(), "answer": a.strip()} if isinstance(q, str) and isinstance(a, str) else None


def _from_json(obj: object) -> list[dict]:
    if isinstance(obj, dict):
        inner = next((v for v in obj.values() if isinstance(v, list)), None)
        return _from_json(inner) if inner is not None else [p for p in [_pair(obj)] if p]
    return [p for p in map(_pair, obj) if p] if isinstance(obj, list) else []


def parse_pairs(text: str) -> list[dict] | None:
    """Generator output -> [{question, answer}], or None when nothing usable is in it (malformed).

    Accepted: a JSON array of objects, an object holding such an array or one pair, either inside a code
    fence or surrounded by prose; a truncated array (complete objects are salvaged); `Q:`/`A:` lines.
    >>> parse_pairs('Sure! ```json\\n[{"question": "Who?", "answer": "Ada."}]\\n```')
    [{'question': 'Who?', 'answer': 'Ada.'}]
    """
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    for a, b in ("[]", "{}"):
        i, j = text.find(a), text.rfind(b)
        if 0 <= i < j:
            candidates.append(text[i : j + 1])
    for c in candidates:
        try:
            pairs = _from_json(json.loads(c))
        except json.JSONDecodeError:
            continue
        if pairs:
            return pairs
    salvaged = []
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            salvaged += [p for p in [_pair(json.loads(m.group(0)))] if p]
        except json.JSONDecodeError:
            continue
    return salvaged or _from_qa_lines(text) or None


def _from_qa_lines(text: str) -> list[dict]:
    pairs, q, a, into = [], None, None, None
    for line in text.splitlines() + ["Q:"]:
        m = _QA_LINE.match(line)
        if m and m.group(1).lower().startswith("q"):
            if q and a:
                pairs.append({"question": q.strip(), "answer": a.strip()})
            q, a, into = m.group(2), None, "q"
        elif m:
            a, into = m.group(2), "a"
        elif re.fullmatch(r"\s*(Q|A|Question|Answer)\s*\d*\s*", line, re.IGNORECASE):
            continue  # a marker without its colon (output cut short): not part of the answer
        elif into == "a" and line.strip():
            a += " " + line.strip()  # an answer may run over several lines
        elif into == "q" and line.strip():
            q += " " + line.strip()
    return pairs


# ---- filters ----


def content_words(text: str) -> list[str]:
    """Normalized words minus stopwords: what an answer must share with its chunk.

    >>> content_words("The CLI exits with code 2.")
    ['cli', 'exits', 'code', '2']
    """
    return [w for w in normalize_text(text).split() if w not in _STOP]


def grounding(answer: str, chunk_text: str) -> float:
    """Share of the answer's content words found in the chunk (0 when the answer has none)."""
    words = content_words(answer)
    have = set(normalize_text(chunk_text).split())
    return sum(w in have for w in words) / len(words) if words else 0.0


@dataclass
class Questions:
    """Kept questions of one side: exact (normalized) lookup plus word 3-gram sets for near duplicates."""

    exact: set[str] = field(default_factory=set)
    grams: list[set[int]] = field(default_factory=list)
    index: dict[int, list[int]] = field(default_factory=dict)  # shingle -> kept questions holding it

    def near(self, q: str) -> bool:
        if normalize_text(q) in self.exact:
            return True
        g = shingles(q)
        seen = {i for h in g for i in self.index.get(h, ())}
        return any(jaccard(g, self.grams[i]) >= NEAR_DUPLICATE for i in seen)

    def add(self, q: str) -> None:
        self.exact.add(normalize_text(q))
        g = shingles(q)
        for h in g:
            self.index.setdefault(h, []).append(len(self.grams))
        self.grams.append(g)


def verdict(pair: dict, chunk: Chunk, s: SynthConfig, mine: Questions, other: Questions) -> str:
    """'kept' or the filter that drops the pair.

    In order: length (answer chars; question content words), grounding, echo, duplicate (same side) or
    leakage (other side).
    """
    q, a = pair["question"], pair["answer"]
    if not (s.min_answer_chars <= len(a) <= s.max_answer_chars) or len(content_words(q)) < 2:
        return "length"  # a question needs two content words to name its subject ("[1]" and "Why?" do not)
    if grounding(a, chunk.heading + "\n" + chunk.text) < s.min_grounding:
        return "grounding"
    if set(content_words(a)) <= set(content_words(q)):
        return (
            "echo"  # the answer only restates its question ("How do you run X?" "Run X."): nothing to learn
        )
    if mine.near(q):
        return "duplicate"
    if other.near(q):
        return "leakage"
    return "kept"
