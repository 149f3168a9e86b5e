"""Retrieval over a list of passages: BM25, dense, or both fused by reciprocal rank; built once, persisted.

The index folder holds passages.jsonl, the rankers' files (stores.py) and meta.json, written LAST, with the
hash of (passages, kind, embedder, vector store, BM25 stemmer). `open_retriever` loads the folder when that
hash matches and otherwise rebuilds it (meta.json removed first, stale files of the other kind removed), so an
index of other passages or another kind is never mixed in, and a build cut short is never taken for a
finished one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import UserError
from tunesmith.retrieve.corpus import Passage
from tunesmith.retrieve.embed import Embedder, require_embedder
from tunesmith.retrieve.stores import EXACT_MAX, STORE_NAMES, Bm25, ExactVectors, HnswVectors, Ranked

KINDS = ("bm25", "dense", "hybrid")
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009): 1/(60 + rank) per list
HYBRID_DEPTH = 50  # candidates each ranker hands to the fusion
FORMAT = 2  # bump when the files change meaning (2: BM25 tokens stemmed, meta.json names the stemmer)


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: its score (BM25, cosine, or fused) and its 1-based rank."""

    passage: Passage
    score: float
    rank: int


def rrf(lists: list[Ranked], k: int) -> Ranked:
    """Reciprocal-rank fusion: score(p) = sum over lists of 1 / (RRF_K + rank of p); k best, ties by index.

    >>> [i for i, _ in rrf([[(0, 9.0), (1, 5.0)], [(1, 0.9), (2, 0.8)]], 3)]
    [1, 0, 2]
    """
    fused: dict[int, float] = {}
    for ranked in lists:
        for r, (i, _) in enumerate(ranked, start=1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + r)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]


class Retriever:
    """Passages and the rankers over them (a Bm25, a vector store, or both)."""

    def __init__(
        self,
        passages: list[Passage],
        kind: str,
        bm25: Bm25 | None,
        vectors: ExactVectors | HnswVectors | None,
        embedder: Embedder | None,
    ) -> None:
        self.passages, self.kind = passages, kind
        self.bm25, self.vectors, self.embedder = bm25, vectors, embedder

    def search(self, query: str, k: int) -> list[Hit]:
        """The k best passages for one query, best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The k best passages per query (fewer when fewer match: BM25 skips passages sharing no word)."""
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        if not queries:
            return []
        k = min(k, len(self.passages))
        depth = min(len(self.passages), max(k, HYBRID_DEPTH)) if self.kind == "hybrid" else k
        lists: list[list[Ranked]] = []
        if self.bm25 is not None:
            lists.append(self.bm25.rank(queries, depth))
        if self.vectors is not None:
            lists.append(self.vectors.rank(self.embedder.encode(queries), depth))  # (Q, D) unit rows
        rows = lists[0] if len(lists) == 1 else [rrf([ls[q] for ls in lists], k) for q in range(len(queries))]
        return [[Hit(self.passages[i], s, r) for r, (i, s) in enumerate(row[:k], start=1)] for row in rows]


def recall_at_k(hits: list[list[Hit]], gold_ids: list[str | None], k: int) -> float | None:
    """Share of questions with a known source passage that find it in their top k; None when none is known.

    >>> h = [[Hit(Passage("a", "", "train"), 1.0, 1)], [Hit(Passage("b", "", "train"), 1.0, 1)]]
    >>> recall_at_k(h, ["a", "c"], 1), recall_at_k(h, [None, None], 1)
    (0.5, None)
    """
    if len(hits) != len(gold_ids):
        raise ValueError(f"{len(hits)} hit lists vs {len(gold_ids)} gold ids")
    known = [(row, gold) for row, gold in zip(hits, gold_ids, strict=True) if gold is not None]
    if not known:
        return None
    return sum(any(h.passage.id == gold for h in row[:k]) for row, gold in known) / len(known)


def _fingerprint(
    passages: list[Passage], kind: str, embedder_name: str | None, store: str | None, stemmer: str | None
) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, kind, embedder_name, store, stemmer]).encode())
    for p in passages:
        h.update(json.dumps([p.id, p.text, p.source], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def _files(kind: str, store: str | None) -> list[str]:
    bm25 = list(Bm25.FILES) if kind != "dense" else []
    vectors = list(STORE_NAMES[store].FILES) if store is not None else []
    return ["passages.jsonl", *bm25, *vectors]


def _check(kind: str, passages: list[Passage], embedder_name: str | None, where: str) -> None:
    if kind not in KINDS:
        raise UserError(f"{where}.retriever: unknown kind '{kind}' (use {', '.join(KINDS)})")
    if not passages:
        raise UserError(f"{where}.corpus: no passages to retrieve from (check the corpus)")
    if len({p.id for p in passages}) != len(passages):
        raise ValueError("passage ids must be unique")
    if kind != "bm25" and embedder_name is None:
        require_embedder(None, where)  # raises: dense retrieval without an embedder named


def open_retriever(
    passages: list[Passage],
    kind: str,
    index_dir: Path,
    embedder_name: str | None,
    embedder: Embedder | None = None,
    exact_max: int = EXACT_MAX,
    where: str = "rag",
    stemmer: str = "english",
) -> Retriever:
    """The retriever over `passages`, loaded from `index_dir` when built there from the same inputs, else
    built and saved there. `embedder` (optional): `embedder_name` already loaded, so it is not loaded twice;
    `where` names the config section in errors ("eval.rag", "serve.rag"); `stemmer`: BM25's (rag.stemmer).
    """
    _check(kind, passages, embedder_name, where)
    index_dir = Path(index_dir)
    dense = kind != "bm25"
    embedder_name = embedder_name if dense else None
    stemmer = stemmer if kind != "dense" else None  # only BM25 tokenizes: a dense index ignores it
    store = ("exact" if len(passages) <= exact_max else "hnsw") if dense else None
    fingerprint = _fingerprint(passages, kind, embedder_name, store, stemmer)
    if dense and embedder is None:
        embedder = require_embedder(embedder_name, where)
    meta = read_meta(index_dir)
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return _load(index_dir, meta, passages, embedder)
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "kind": kind,
        "embedder": embedder_name,
        "store": store,
        "stemmer": stemmer,
        "passages": len(passages),
        "files": _files(kind, store),
    }
    return _build(index_dir, passages, meta, embedder)


def read_meta(index_dir: Path) -> dict | None:
    """A finished index's meta.json (kind, embedder, store, stemmer, passages, files), else None."""
    index_dir = Path(index_dir)
    try:
        meta = json.loads((index_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != FORMAT or not all((index_dir / f).exists() for f in meta.get("files", [])):
        return None
    return meta


def _build(index_dir: Path, passages: list[Passage], meta: dict, embedder: Embedder | None) -> Retriever:
    """Write the index files, meta.json last; stale files of another kind or store are removed first."""
    kind, store = meta["kind"], meta["store"]
    index_dir.mkdir(parents=True, exist_ok=True)
    (index_dir / "meta.json").unlink(missing_ok=True)  # from here on the folder holds no finished index
    for stale in {"bm25", "vectors.npy", "vectors.faiss"} - set(meta["files"]):
        if (index_dir / stale).is_dir():
            shutil.rmtree(index_dir / stale)
        else:
            (index_dir / stale).unlink(missing_ok=True)
    with open(index_dir / "passages.jsonl", "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "text": p.text, "source": p.source}, ensure_ascii=False) + "\n")
    texts = [p.text for p in passages]
    bm25 = Bm25.build(texts, meta["stemmer"]) if kind != "dense" else None
    if bm25 is not None:
        shutil.rmtree(index_dir / "bm25", ignore_errors=True)
        bm25.save(index_dir)
    vectors = None
    if store is not None:
        embedded = embedder.encode(texts)  # (N, D) unit rows
        vectors = ExactVectors(embedded) if store == "exact" else HnswVectors.build(embedded)
        vectors.save(index_dir)
    tmp = index_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(index_dir / "meta.json")
    return Retriever(passages, kind, bm25, vectors, embedder)


def _load(index_dir: Path, meta: dict, passages: list[Passage], embedder: Embedder | None) -> Retriever:
    kind, store = meta["kind"], meta["store"]
    bm25 = Bm25.load(index_dir, meta["stemmer"]) if kind != "dense" else None
    vectors = STORE_NAMES[store].load(index_dir) if store is not None else None
    return Retriever(passages, kind, bm25, vectors, embedder)


def load_retriever(index_dir: Path, embedder: Embedder | None = None) -> Retriever:
    """The retriever saved in `index_dir` (by open_retriever), from its files alone."""
    index_dir = Path(index_dir)
    meta = read_meta(index_dir)
    if meta is None:
        raise UserError(
            f"{index_dir}: no finished retrieval index here (build one with a rag.corpus, or fix the path)"
        )
    with open(index_dir / "passages.jsonl", encoding="utf-8") as f:
        passages = [Passage(**json.loads(line)) for line in f]
    if (
        _fingerprint(passages, meta["kind"], meta["embedder"], meta["store"], meta["stemmer"])
        != meta["fingerprint"]
    ):
        raise UserError(f"{index_dir}/passages.jsonl: changed since the index was built (delete {index_dir})")
    if meta["kind"] != "bm25" and embedder is None:
        embedder = require_embedder(meta["embedder"], "rag")
    return _load(index_dir, meta, passages, embedder)
