"""What retrieval searches: passages from the training pairs or from chunked documents.

Documents are found, read and chunked by data/documents.py, the same readers and chunker synth uses, so a
folder that synth turned into QA pairs is the same text when retrieved from.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import UserError
from tunesmith.data.documents import chunk_documents, find_documents, word_spans
from tunesmith.data.formats import Example, as_messages, prompt_key


@dataclass(frozen=True)
class Passage:
    """One retrievable piece of text; `id` is stable across runs ("train:<i>" or "<file>#<chunk i>")."""

    id: str
    text: str  # what goes into the prompt
    source: str  # the document's name, or "train"


def passages_from_pairs(pairs: list[tuple[str, str]], ids: list[str]) -> list[Passage]:
    """(question, answer) pairs -> passages "Q: <question>\\nA: <answer>" with the given ids.

    >>> passages_from_pairs([("Who?", "Ann")], ["train:0"])
    [Passage(id='train:0', text='Q: Who?\\nA: Ann', source='train')]
    """
    if len(pairs) != len(ids):
        raise ValueError(f"{len(pairs)} pairs vs {len(ids)} ids")
    return [Passage(i, f"Q: {q}\nA: {a}", "train") for (q, a), i in zip(pairs, ids, strict=True)]


def pair_of(example: Example) -> tuple[str, str]:
    """(question, answer) an example teaches: its prompt text and its last assistant turn."""
    answer = next(m["content"] for m in reversed(as_messages(example)) if m["role"] == "assistant")
    return prompt_key(example).strip(), answer


def passages_from_examples(examples: list[Example]) -> list[Passage]:
    """Training examples -> passages "train:<i>", i = the example's position in `examples`."""
    return passages_from_pairs([pair_of(ex) for ex in examples], [f"train:{i}" for i in range(len(examples))])


def _token_spans(tok):
    """text -> character spans of the tokenizer's tokens (words when there is no tokenizer)."""
    if tok is None:
        return word_spans

    def spans(text: str) -> list[tuple[int, int]]:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [tuple(s) for s in enc["offset_mapping"]]

    return spans


def _document_paths(path: str, where: str) -> list[Path]:
    """A file, a folder or a glob -> the paths find_documents takes."""
    if any(c in path for c in "*?["):
        found = sorted(glob.glob(path, recursive=True))
        if not found:
            raise UserError(f"{path}: the pattern matches no file (point {where}.corpus at documents)")
        return [Path(p) for p in found]
    return [Path(path)]


def passages_from_documents(
    path: str, tok, chunk_tokens: int, overlap_tokens: int, where: str = "rag"
) -> list[Passage]:
    """Documents under `path` -> chunks of `chunk_tokens` tokens of `tok` (None: words), ids "<file>#<i>".

    A chunk's section heading leads its text, so a passage says what it is about even cut from its start.
    Missing, empty or unreadable documents are a UserError naming the path (`where` names the config section).
    """
    if overlap_tokens >= chunk_tokens:
        raise UserError(
            f"{where}.overlap_tokens ({overlap_tokens}) must be smaller than "
            f"{where}.chunk_tokens ({chunk_tokens})"
        )
    docs = find_documents(_document_paths(path, where))
    chunks = chunk_documents(docs, _token_spans(tok), chunk_tokens, overlap_tokens)
    if not chunks:
        raise UserError(f"{path}: the documents hold no text to retrieve from ({where}.corpus)")
    return [Passage(c.id, f"{c.heading}\n{c.text}" if c.heading else c.text, c.source) for c in chunks]
