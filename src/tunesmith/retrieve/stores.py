"""The three rankers behind a Retriever, each built once, saved to and loaded from the index folder.

- `Bm25`: lexical, through `bm25s` (sparse matrices; lowercased words, English stopwords, and the
  Snowball English stemmer from PyStemmer unless rag.stemmer=none, so "earning" finds "earnings").
- `ExactVectors`: dense, an exact inner-product scan in numpy over unit vectors, up to `EXACT_MAX`.
- `HnswVectors`: dense, a faiss HNSW graph (32 links, efSearch 128), for corpora past `EXACT_MAX`.

Measured by bench/retrieve_store.py (384-d unit vectors, 200 queries, recall@10 against the exact top 10,
2 shared CPU cores; the build and query times swing 3-7x with the machine's load):
- the exact scan needs no build and answers in 0.2 ms a query at 10k vectors and 1.3-9 ms at 100k (150 MB):
  below a few hundred thousand passages nothing beats it, so it is the default;
- faiss HNSW at 100k clustered vectors (what embeddings of a corpus look like): 1.3 ms a query, recall
  1.000, but 50-240 s to build; on structureless random vectors (the worst case) recall falls to 0.26;
- LanceDB at 100k: a flat search 136-780 ms a query (one query per call), IVF-PQ 10-12 ms a query after a
  75-410 s build, recall 0.997 clustered / 0.23 random.
faiss, then: it searches a whole batch of queries in one call (eval asks hundreds at once), 5-10x faster
per query than LanceDB's index at equal or better recall, builds 2x faster, saves to one file and is one
wheel, where LanceDB brings pyarrow and the lance engine. LanceDB's strengths (out-of-core tables, filters,
versions) are not needed for passages that fit in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunesmith.config import UserError

# Above this many passages the dense index is a faiss HNSW graph instead of an exact scan.
EXACT_MAX = 200_000
_WORD = r"(?u)\b\w+\b"  # single characters count: "Q3", "5" and "A" can be the words that matter

Ranked = list[tuple[int, float]]  # (passage index, score), best first


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise UserError("retrieval: BM25 needs bm25s (pip install 'tunesmith[eval]')") from None
    return bm25s


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError(
            "retrieval: a dense index this large needs faiss (pip install 'tunesmith[eval]')"
        ) from None
    return faiss


def _stemmer(name: str):
    """rag.stemmer -> a PyStemmer stemmer for bm25s, or None for "none"."""
    if name == "none":
        return None
    try:
        import Stemmer
    except ImportError:
        raise UserError(
            f"retrieval: rag.stemmer={name} needs PyStemmer (pip install 'tunesmith[eval]', or stemmer: none)"
        ) from None
    return Stemmer.Stemmer(name)


def words(texts: list[str], stemmer: str = "english") -> list[list[str]]:
    """BM25's tokens: lowercased words, English stopwords dropped, stemmed by `stemmer` ("none": as is)."""
    bm25s = _bm25s()
    return bm25s.tokenize(
        texts,
        stopwords="en",
        stemmer=_stemmer(stemmer),
        return_ids=False,
        show_progress=False,
        token_pattern=_WORD,
    )


class Bm25:
    """A BM25 index over passage texts; a passage sharing no word with the query is never returned.

    Queries are tokenized with the stemmer the passages were (it is not in bm25s' files: index.py keeps it in
    meta.json and hands it back to `load`).
    """

    FILES = ("bm25",)

    def __init__(self, index, stemmer: str) -> None:
        self.index, self.stemmer = index, stemmer  # bm25s.BM25, rag.stemmer

    @classmethod
    def build(cls, texts: list[str], stemmer: str = "english") -> Bm25:
        """Index `texts` (passage order is the index order)."""
        index = _bm25s().BM25()
        index.index(words(texts, stemmer), show_progress=False)
        return cls(index, stemmer)

    def save(self, folder: Path) -> None:
        """Write the index under folder/bm25/."""
        self.index.save(str(folder / "bm25"))

    @classmethod
    def load(cls, folder: Path, stemmer: str = "english") -> Bm25:
        """Read what `save` wrote; `stemmer`: the one it was built with."""
        return cls(_bm25s().BM25.load(str(folder / "bm25")), stemmer)

    def rank(self, queries: list[str], depth: int) -> list[Ranked]:
        """The `depth` best passages per query, by BM25 score; zero scores (no shared word) left out."""
        tokens = words(queries, self.stemmer)
        if not any(tokens):  # bm25s cannot score a batch of empty queries
            return [[] for _ in queries]
        docs, scores = self.index.retrieve(tokens, k=depth, show_progress=False, n_threads=0)
        return [
            [(int(d), float(s)) for d, s in zip(row_d, row_s, strict=True) if s > 0]
            for row_d, row_s in zip(docs, scores, strict=True)
        ]


def _top(scores: np.ndarray, depth: int) -> list[Ranked]:
    """(Q, N) scores -> the `depth` best (index, score) per row, best first (ties: lower index first)."""
    part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]  # (Q, depth), unordered
    out = []
    for row, cand in zip(scores, part, strict=True):
        order = sorted(cand.tolist(), key=lambda j: (-row[j], j))
        out.append([(j, float(row[j])) for j in order])
    return out


class ExactVectors:
    """Unit vectors (N, D) searched by an exact inner-product scan."""

    FILES = ("vectors.npy",)

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors.astype(np.float32, copy=False)  # (N, D)

    def save(self, folder: Path) -> None:
        """Write folder/vectors.npy."""
        np.save(folder / "vectors.npy", self.vectors)

    @classmethod
    def load(cls, folder: Path) -> ExactVectors:
        """Read what `save` wrote."""
        return cls(np.load(folder / "vectors.npy"))

    def rank(self, queries: np.ndarray, depth: int) -> list[Ranked]:
        """(Q, D) unit query vectors -> the `depth` nearest passages each, by cosine."""
        step = max(1, 2**25 // len(self.vectors))  # queries per matmul: at most 32M scores (128 MB) at once
        queries = queries.astype(np.float32)
        return [
            row
            for a in range(0, len(queries), step)
            for row in _top(queries[a : a + step] @ self.vectors.T, depth)  # (step, N) cosines
        ]


class HnswVectors:
    """Unit vectors in a faiss HNSW graph (inner product): approximate, for corpora past EXACT_MAX."""

    FILES = ("vectors.faiss",)
    EF_SEARCH = 128  # candidates kept per query; recall rises with it (bench/retrieve_store.py)

    def __init__(self, index) -> None:
        self.index = index  # faiss.IndexHNSWFlat
        self.index.hnsw.efSearch = self.EF_SEARCH

    @classmethod
    def build(cls, vectors: np.ndarray) -> HnswVectors:
        """A graph of 32 links per node over `vectors` (N, D)."""
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index)

    def save(self, folder: Path) -> None:
        """Write folder/vectors.faiss."""
        _faiss().write_index(self.index, str(folder / "vectors.faiss"))

    @classmethod
    def load(cls, folder: Path) -> HnswVectors:
        """Read what `save` wrote."""
        return cls(_faiss().read_index(str(folder / "vectors.faiss")))

    def rank(self, queries: np.ndarray, depth: int) -> list[Ranked]:
        """(Q, D) unit query vectors -> up to `depth` near passages each (faiss pads a short row with -1)."""
        self.index.hnsw.efSearch = max(self.EF_SEARCH, depth)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
        return [
            [(int(j), float(s)) for j, s in zip(row_i, row_s, strict=True) if j >= 0]
            for row_i, row_s in zip(ids, scores, strict=True)
        ]


STORE_NAMES = {"exact": ExactVectors, "hnsw": HnswVectors}
