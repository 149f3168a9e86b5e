"""A `rag:` config section (eval.rag or serve.rag) -> its passages, its index folder and its retriever.

eval's +rag systems and `serve.rag` both come through `open_rag`, so with the same settings they build the
same passages with the same tokenizer and share one persisted index (<out_dir>/retrieval by default) instead
of rebuilding it for each other.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config, UserError
from tunesmith.config.schema import RagConfig
from tunesmith.retrieve.corpus import Passage, passages_from_documents, passages_from_examples
from tunesmith.retrieve.embed import Embedder
from tunesmith.retrieve.index import Retriever, open_retriever

INDEX_DIR = "retrieval"


def index_dir_of(cfg: Config, rag: RagConfig) -> Path:
    """rag.index_dir, else <out_dir>/retrieval."""
    return Path(rag.index_dir) if rag.index_dir else Path(cfg.out_dir) / INDEX_DIR


def embedder_name_of(cfg: Config, rag: RagConfig) -> str | None:
    """rag.embedding_model, else eval.embedding_model (None for BM25, which needs none)."""
    if rag.retriever == "bm25":
        return None
    return rag.embedding_model or cfg.eval.embedding_model


def train_passages(cfg: Config, tok, where: str, train_examples: list | None = None) -> list[Passage]:
    """The run's training pairs (never its test split) as passages "train:<i>", i = position in
    `data.pipeline.build(...).train_examples` (the run's cached split when there is one).

    `train_examples`: that list when the caller already built the data (compare), so it is not built twice.
    """
    from tunesmith.data.pipeline import build

    if cfg.data.format == "text" or cfg.data.streaming:
        raise UserError(
            f"{where}.corpus: 'train' needs question/answer training data (data.format={cfg.data.format}"
            f"{', streaming' if cfg.data.streaming else ''}); point {where}.corpus at a folder of documents"
        )
    if train_examples is None:
        train_examples = build(cfg, tok, cfg.out_dir).train_examples
    return passages_from_examples(train_examples)


def rag_passages(
    cfg: Config, rag: RagConfig, tok, where: str, train_examples: list | None = None
) -> list[Passage]:
    """The passages `rag.corpus` names: the training pairs ('train') or chunked documents (a path)."""
    if rag.corpus == "train":
        return train_passages(cfg, tok, where, train_examples)
    return passages_from_documents(rag.corpus, tok, rag.chunk_tokens, rag.overlap_tokens, where)


def open_rag(
    cfg: Config,
    rag: RagConfig,
    tok,
    where: str,
    embedder: Embedder | None = None,
    train_examples: list | None = None,
) -> Retriever:
    """The retriever for a `rag:` section, loaded from its index folder or built there once.

    `tok` counts document chunk tokens (and renders the training split for corpus=train): pass the base
    model's tokenizer (`model.load.load_tokenizer(cfg.model)`) so eval and serve build the same index.
    `where` ("eval.rag" / "serve.rag") names the section in errors; `embedder`: one already loaded (used
    only when it is the one the section names); `train_examples`: the built training split, if at hand.
    """
    passages = rag_passages(cfg, rag, tok, where, train_examples)
    name = embedder_name_of(cfg, rag)
    loaded = embedder if embedder is not None and embedder.name == name else None  # else loaded by name
    return open_retriever(
        passages,
        rag.retriever,
        index_dir_of(cfg, rag),
        name,
        loaded,
        where=where,
        stemmer=rag.stemmer,
    )
