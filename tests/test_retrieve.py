"""Retrieval on a synthetic corpus with known answers: 20 made-up creatures, each in one passage.

Every expectation is hand-computable: an entity's name occurs in its passage only, so BM25 ranks that
passage first for the name; the real packaged MiniLM embedder ranks it first for the passage's question.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import tiny
from tunesmith.config import UserError
from tunesmith.retrieve.corpus import Passage, passages_from_documents, passages_from_pairs
from tunesmith.retrieve.embed import PACKAGED_EMBEDDER, Embedder, packaged_model_dir, require_embedder
from tunesmith.retrieve.index import Hit, load_retriever, open_retriever, recall_at_k, rrf
from tunesmith.retrieve.prompt import rag_messages

NAMES = [
    "zorblax",
    "quintara",
    "velmoth",
    "drusk",
    "plenivore",
    "ostrago",
    "krellum",
    "wyvarine",
    "tolbeck",
    "marnish",
    "quorral",
    "fendrake",
    "lumitus",
    "brask",
    "ozzaren",
    "pelgrim",
    "thrune",
    "vascolin",
    "yerrow",
    "gimbold",
]
COLOURS = ["red", "blue", "green", "amber", "violet", "teal", "ochre", "silver", "crimson", "ivory"]
PLACES = [
    "marshes",
    "dunes",
    "caves",
    "cliffs",
    "reefs",
    "tundra",
    "meadows",
    "canyons",
    "glaciers",
    "forests",
]
QUESTIONS = [f"Where does the {n} live?" for n in NAMES]
PAIRS = [
    (q, f"The {n} lives in the {PLACES[i % 10]} and is {COLOURS[i % 10]}.")
    for i, (q, n) in enumerate(zip(QUESTIONS, NAMES, strict=True))
]
IDS = [f"train:{i}" for i in range(len(PAIRS))]

needs_embedder = pytest.mark.skipif(packaged_model_dir() is None, reason=f"{PACKAGED_EMBEDDER} not installed")


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to encode (what stands for "the index was built")."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.name, self.encoded = inner, inner.name, 0

    def encode(self, texts: list[str]):
        self.encoded += len(texts)
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return require_embedder(PACKAGED_EMBEDDER, "rag")


def test_bm25_ranks_the_passage_naming_the_entity_first(tmp_path):
    r = open_retriever(passages_from_pairs(PAIRS, IDS), "bm25", tmp_path / "idx", None)
    hits = r.search_many(NAMES, 3)
    assert [h[0].passage.id for h in hits] == IDS
    assert all(h[0].rank == 1 and h[0].score > 0 for h in hits)
    # the name is in one passage only, and nothing else in the query is a word of the corpus
    assert all(len(h) == 1 for h in hits)
    assert recall_at_k(hits, IDS, 1) == 1.0
    assert r.search("penguins", 5) == []  # shares no word with any passage: nothing, not noise
    # creatures 3 and 13 are the amber ones in the cliffs; every other passage shares neither word
    assert sorted(h.passage.id for h in r.search("amber cliffs", 5)) == ["train:13", "train:3"]


def test_bm25_stemmer_matches_word_forms_and_a_stemmer_change_rebuilds(tmp_path):
    pytest.importorskip("Stemmer")
    passages = [Passage("a", "Quarterly earnings rose.", "doc"), Passage("b", "The harbour froze.", "doc")]
    idx = tmp_path / "idx"
    stemmed = open_retriever(passages, "bm25", idx, None, stemmer="english")
    assert [h.passage.id for h in stemmed.search("earning", 2)] == ["a"]  # earning, earnings -> earn
    assert json.loads((idx / "meta.json").read_text())["stemmer"] == "english"
    # loaded from its files alone, queries are stemmed as the passages were
    assert [h.passage.id for h in load_retriever(idx).search("earning", 2)] == ["a"]
    exact = open_retriever(passages, "bm25", idx, None, stemmer="none")  # rebuilt, not the stemmed one
    assert json.loads((idx / "meta.json").read_text())["stemmer"] == "none"
    assert exact.search("earning", 2) == [] and [h.passage.id for h in exact.search("earnings", 2)] == ["a"]
    assert load_retriever(idx).search("earning", 2) == []


@needs_embedder
@pytest.mark.parametrize("kind", ["dense", "hybrid"])
def test_dense_and_hybrid_recall_every_question(tmp_path, minilm, kind):
    r = open_retriever(passages_from_pairs(PAIRS, IDS), kind, tmp_path / kind, PACKAGED_EMBEDDER, minilm)
    hits = r.search_many(QUESTIONS, 3)
    assert recall_at_k(hits, IDS, 1) == 1.0
    assert all([h.rank for h in row] == [1, 2, 3] for row in hits)
    assert all(row[0].score >= row[1].score >= row[2].score for row in hits)


def test_rrf_and_recall_by_hand():
    # passage 1: 1/62 + 1/61; passage 0: 1/61; passage 2: 1/62
    assert rrf([[(0, 9.0), (1, 5.0)], [(1, 0.9), (2, 0.8)]], 3) == [
        (1, pytest.approx(1 / 62 + 1 / 61)),
        (0, pytest.approx(1 / 61)),
        (2, pytest.approx(1 / 62)),
    ]
    p = [Passage(i, i, "train") for i in "abc"]
    hits = [[Hit(p[0], 1.0, 1), Hit(p[1], 0.5, 2)], [Hit(p[2], 1.0, 1)], [Hit(p[1], 1.0, 1)]]
    assert recall_at_k(hits, ["b", "a", None], 1) == 0.0
    assert recall_at_k(hits, ["b", "a", None], 2) == 0.5
    assert recall_at_k(hits, [None, None, None], 2) is None


@needs_embedder
def test_a_planted_passage_outside_the_corpus_is_never_retrieved(tmp_path, minilm):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(0, 20, 2):
        body = " ".join(a for _, a in PAIRS[i : i + 2])
        (corpus / f"doc{i}.md").write_text(f"# Creatures {i}\n\n{body}\n")
    planted = "The glimmerox lives in the volcano and is gold."
    (tmp_path / "planted.md").write_text(f"# Test answer\n\n{planted}\n")  # beside the corpus, not in it
    passages = passages_from_documents(str(corpus), tiny.tokenizer(), 24, 4)
    assert {p.source for p in passages} == {f"corpus/doc{i}.md" for i in range(0, 20, 2)}
    for kind in ("bm25", "dense", "hybrid"):
        r = open_retriever(passages, kind, tmp_path / kind, PACKAGED_EMBEDDER, minilm)
        hits = r.search_many([planted, "glimmerox volcano gold", "Where does the glimmerox live?"], 5)
        assert all(
            "glimmerox" not in h.passage.text and "planted" not in h.passage.id for row in hits for h in row
        )
        assert all(h.passage in passages for row in hits for h in row)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@needs_embedder
def test_second_open_loads_the_index_and_changed_passages_rebuild(tmp_path, minilm):
    idx, passages = tmp_path / "idx", passages_from_pairs(PAIRS, IDS)
    first = CountingEmbedder(minilm)
    open_retriever(passages, "hybrid", idx, PACKAGED_EMBEDDER, first)
    assert first.encoded == 20
    before = _mtimes(idx)
    assert {"meta.json", "passages.jsonl", "vectors.npy"} <= set(before) and any(
        f.startswith("bm25") for f in before
    )

    again = CountingEmbedder(minilm)
    r = open_retriever(passages, "hybrid", idx, PACKAGED_EMBEDDER, again)
    assert again.encoded == 0 and _mtimes(idx) == before  # loaded, not rebuilt
    assert r.search("Where does the drusk live?", 1)[0].passage.id == "train:3"

    changed = passages[:3] + [Passage("train:3", "Q: Where does the drusk live?\nA: On the moon.", "train")]
    rebuilt = CountingEmbedder(minilm)
    r = open_retriever(changed, "hybrid", idx, PACKAGED_EMBEDDER, rebuilt)
    assert rebuilt.encoded == 4 and len(r.passages) == 4
    assert (idx / "passages.jsonl").read_text().count("\n") == 4 and "moon" in (
        idx / "passages.jsonl"
    ).read_text()

    # another kind in the same folder: the other kind's files go, never mixed in
    open_retriever(changed, "bm25", idx, None)
    assert json.loads((idx / "meta.json").read_text())["kind"] == "bm25"
    assert not (idx / "vectors.npy").exists()
    assert [h.passage.id for h in load_retriever(idx).search("moon", 3)] == ["train:3"]


@needs_embedder
def test_load_retriever_round_trip_and_the_hnsw_store(tmp_path, minilm):
    passages = passages_from_pairs(PAIRS, IDS)
    for store, exact_max in (("exact", 1000), ("hnsw", 5)):  # 20 passages > 5: the faiss graph
        idx = tmp_path / store
        r = open_retriever(passages, "dense", idx, PACKAGED_EMBEDDER, minilm, exact_max=exact_max)
        assert json.loads((idx / "meta.json").read_text())["store"] == store
        back = load_retriever(idx, minilm)
        assert back.passages == passages and back.kind == "dense"
        want, got = r.search_many(QUESTIONS, 3), back.search_many(QUESTIONS, 3)
        assert [[h.passage.id for h in row] for row in got] == [[h.passage.id for h in row] for row in want]
        assert recall_at_k(got, IDS, 1) == 1.0


def test_bad_corpus_and_index_paths_are_one_line_user_errors(tmp_path):
    cases = [
        lambda: passages_from_documents(str(tmp_path / "missing"), None, 64, 8),
        lambda: passages_from_documents(str(tmp_path / "*.md"), None, 64, 8),
        lambda: passages_from_documents(str(tmp_path), None, 64, 8),  # a folder with no documents
        lambda: passages_from_documents(str(tmp_path), None, 32, 32),
        lambda: load_retriever(tmp_path / "no-index"),
        lambda: open_retriever(passages_from_pairs(PAIRS, IDS), "dense", tmp_path / "i", None),
        lambda: open_retriever([], "bm25", tmp_path / "i", None),
    ]
    for make in cases:
        with pytest.raises(UserError) as e:
            make()
        assert "\n" not in str(e.value) and str(e.value)
    (tmp_path / "blank.md").write_text("\n\n")
    with pytest.raises(UserError, match="no text to retrieve"):
        passages_from_documents(str(tmp_path / "blank.md"), None, 64, 8)


def test_documents_chunk_with_ids_and_headings(tmp_path):
    (tmp_path / "a.md").write_text("# Alpha\n\none two three four five six seven\n")
    ps = passages_from_documents(str(tmp_path / "a.md"), None, 4, 1)  # words: windows (0,4) (3,7)
    assert [(p.id, p.text, p.source) for p in ps] == [
        ("a.md#0", "Alpha\none two three four", "a.md"),
        ("a.md#1", "Alpha\nfour five six seven", "a.md"),
    ]


def test_rag_messages_put_the_passages_in_the_last_user_turn():
    hits = [Hit(Passage("train:0", "Q: Where does the drusk live?\nA: Caves.", "train"), 2.0, 1)]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Where does the drusk live?"},
    ]
    out = rag_messages(msgs, hits)
    assert out[:3] == msgs[:3] and msgs[3]["content"] == "Where does the drusk live?"  # input untouched
    assert out[3]["content"].endswith(
        "[1] Q: Where does the drusk live?\nA: Caves.\n\nQuestion: Where does the drusk live?"
    )
    assert rag_messages(msgs, []) == msgs
