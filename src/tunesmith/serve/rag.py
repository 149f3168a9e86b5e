"""serve.rag: the served models answer chat requests with retrieved passages in the prompt.

The retriever is the one eval's +rag systems use (retrieve/rag.py: the same corpus, index folder and prompt
through retrieve/prompt.py's `rag_messages`), so the system the report recommends is the system served.
The passages travel back in an extra `retrieval` field (response body; first chunk of a stream), which
OpenAI clients ignore and the playground shows under each answer. /v1/completions (raw text) is untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.config import Config, UserError
from tunesmith.retrieve.index import Hit, Retriever
from tunesmith.retrieve.prompt import last_user_text, rag_messages


class ServeRag:
    """A retriever and how many passages each answer gets."""

    def __init__(self, retriever: Retriever, k: int) -> None:
        self.retriever, self.k = retriever, k

    def search(self, messages: list[dict]) -> list[Hit]:
        """The top-k passages for the conversation's last user turn (none for an empty one)."""
        query = last_user_text(messages)
        return self.retriever.search(query, self.k) if query.strip() else []


def fit(
    messages: list[dict], hits: list[Hit], render: Callable[[list[dict]], list[int]], room: int
) -> tuple[list[int], list[Hit]]:
    """(prompt ids, passages used): the most best-first passages whose prompt stays within `room` tokens.

    Passages fill the context the user's own words leave, so the lowest-ranked go first when they do not all
    fit; with none fitting the question goes as sent (and the usual context check answers it).
    """
    for n in range(len(hits), 0, -1):
        ids = render(rag_messages(messages, hits[:n]))
        if len(ids) <= room:
            return ids, hits[:n]
    return render(messages), []


def retrieval_json(hits: list[Hit]) -> list[dict]:
    """The `retrieval` field of a response: one object per passage, best first."""
    return [
        {
            "rank": h.rank,
            "id": h.passage.id,
            "source": h.passage.source,
            "score": h.score,
            "text": h.passage.text,
        }
        for h in hits
    ]


def open_serve_rag(cfg: Config) -> ServeRag | None:
    """serve.rag's retriever, its index loaded from (or built once into) serve.rag.index_dir or
    <out_dir>/retrieval; None when serve.rag is not set.

    The corpus is read each start so that an index of other passages is rebuilt, never served stale. A
    deployment may ship the index without its corpus: when the corpus cannot be read but a finished index of
    the configured retriever is there, that index is served as built (and says so).
    """
    rag = cfg.serve.rag
    if rag is None:
        return None
    from tunesmith.model.load import load_tokenizer
    from tunesmith.retrieve.index import load_retriever, read_meta
    from tunesmith.retrieve.rag import index_dir_of, open_rag

    try:  # the base model's tokenizer counts chunk tokens, as eval's +rag does: both share one index
        retriever = open_rag(cfg, rag, load_tokenizer(cfg.model), "serve.rag")
    except UserError as e:
        meta = read_meta(index_dir_of(cfg, rag))
        if meta is None or meta["kind"] != rag.retriever:
            raise
        print(f"serve.rag: {e}; serving the index in {index_dir_of(cfg, rag)} as built")
        retriever = load_retriever(index_dir_of(cfg, rag))
    print(f"serve.rag: {len(retriever.passages)} passages ({rag.retriever}, k={rag.k}) from {rag.corpus}")
    return ServeRag(retriever, rag.k)
