"""What `+fewshot` and `+rag` add to each question, chosen once for every system that uses them.

Few-shot shots come from the training split only; a probe question (itself a training pair) never sees its own
pair. RAG searches the configured corpus (eval.rag.corpus: "train", the training split's pairs with ids
"train:<i>", or a folder of documents) through `retrieve.rag.open_rag`, the path `serve.rag` takes too (same
passages, same index folder: eval.rag.index_dir or <run>/retrieval, same errors). Probe questions are
training pairs, so with the "train" corpus their own pair is the gold passage and retrieval recall@k is
measured on them.
"""

from __future__ import annotations

import time
from pathlib import Path

from tunesmith.config import Config
from tunesmith.data.pipeline import Prepared
from tunesmith.eval.prompts import fewshot_choice, shot_keys
from tunesmith.eval.questions import Questions
from tunesmith.eval.systems import Addons, System

TRAIN_CORPUS = "train"


def own_indices(train_examples: list, qs: Questions) -> list[int | None]:
    """For each question, its index in the training split (probe questions), else None."""
    where = {ex.where: j for j, ex in enumerate(train_examples)}
    return [where.get(ex.where) for ex in qs.examples]


def add_fewshot(
    cfg: Config, data: Prepared, test: Questions, probe: Questions, embedder, addons: Addons
) -> None:
    """Choose each question's shots from the training split (never a test pair, never its own pair)."""
    fs = cfg.eval.fewshot
    train = data.train_examples
    keys = shot_keys(train)
    for qs, attr in ((test, "shots_test"), (probe, "shots_probe")):
        chosen = fewshot_choice(
            keys, qs.questions, own_indices(train, qs), fs.k, fs.select, fs.seed, embedder
        )
        setattr(addons, attr, [[train[j] for j in row] for row in chosen])
    how = f"random, seed {fs.seed}" if fs.select == "random" else "nearest by embedding"
    addons.notes.append(
        f"few-shot: {fs.k} training pairs before each question ({how}); never a test pair, and a probe "
        "question never sees its own pair"
        + (f" (the training split has only {len(train)} pairs)" if len(train) <= fs.k else "")
    )


def add_rag(
    cfg: Config, data: Prepared, qs: tuple[Questions, Questions], tok, run: Path, embedder, addons: Addons
) -> dict:
    """Retrieve top-k passages for every question; returns {retrieval_recall, retrieval_ms}."""
    from tunesmith.retrieve.rag import open_rag

    rc = cfg.eval.rag
    test, probe = qs
    # compare's run dir is this config's out_dir (<run>/retrieval); the split compare built is the corpus
    run_cfg = cfg if Path(cfg.out_dir) == Path(run) else cfg.model_copy(update={"out_dir": str(run)})
    retriever = open_rag(run_cfg, rc, tok, "eval.rag", embedder, data.train_examples)
    queries = test.questions + probe.questions
    t0 = time.perf_counter()
    hits = retriever.search_many(queries, rc.k) if queries else []
    took = time.perf_counter() - t0
    addons.hits_test, addons.hits_probe = hits[: len(test.questions)], hits[len(test.questions) :]
    stats: dict = {"retrieval_ms": 1000 * took / len(queries) if queries else None}
    corpus = "the training split" if rc.corpus == TRAIN_CORPUS else rc.corpus
    addons.notes.append(
        f"RAG: top {rc.k} of {len(retriever.passages)} passages from {corpus} ({rc.retriever}) in the "
        "prompt; the test split is never in the corpus"
    )
    if rc.corpus == TRAIN_CORPUS and addons.hits_probe:
        stats["retrieval_recall"] = probe_recall(addons.hits_probe, data, probe, rc.k)
        addons.notes.append(
            f"retrieval recall@{rc.k}: share of probe questions whose own training pair was retrieved"
        )
    return stats


def probe_recall(hits: list, data: Prepared, probe: Questions, k: int) -> float | None:
    """Recall@k of the probe questions' own training pairs among their retrieved passages (None: no hits)."""
    from tunesmith.retrieve.index import recall_at_k

    gold = [f"train:{j}" for j in own_indices(data.train_examples, probe)]
    return recall_at_k(hits, gold, k) if hits else None


def prepare_addons(
    cfg: Config,
    data: Prepared,
    test: Questions,
    probe: Questions,
    systems: list[System],
    tok,
    run: Path,
    embedder,
) -> tuple[Addons, dict]:
    """Shots and passages for every system that asks for them, and the retrieval stats (empty without RAG)."""
    addons = Addons()
    stats: dict = {}
    if any(s.fewshot for s in systems):
        add_fewshot(cfg, data, test, probe, embedder, addons)
    if any(s.rag for s in systems):
        stats = add_rag(cfg, data, (test, probe), tok, run, embedder, addons)
    return addons, stats
