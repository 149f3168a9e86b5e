"""The one way retrieved passages enter a prompt, for eval's +rag systems and for `serve.rag` alike.

The passages go INTO the last user turn, ahead of the question, not into a system message of their own:
string templates (qa, alpaca) render only the last user turn (generate.prompt_ids), so a separate context
message would be dropped for every model trained with one, and a chat template sees the same text either way.
"""

from __future__ import annotations

from tunesmith.retrieve.index import Hit

INSTRUCTION = "Use the context below if it helps to answer the question."


def context_block(hits: list[Hit]) -> str:
    """The numbered passages, best first: "[1] text" separated by blank lines."""
    return "\n\n".join(f"[{h.rank}] {h.passage.text.strip()}" for h in hits)


def rag_question(question: str, hits: list[Hit]) -> str:
    """A question with its retrieved context ahead of it; the question unchanged when nothing was retrieved.

    >>> from tunesmith.retrieve.corpus import Passage
    >>> print(rag_question("Who?", [Hit(Passage("train:0", "Q: Who?\\nA: Ann", "train"), 1.0, 1)]))
    Use the context below if it helps to answer the question.
    <BLANKLINE>
    Context:
    [1] Q: Who?
    A: Ann
    <BLANKLINE>
    Question: Who?
    """
    if not hits:
        return question
    return f"{INSTRUCTION}\n\nContext:\n{context_block(hits)}\n\nQuestion: {question}"


def rag_messages(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """A conversation with the hits put into its last user turn (a new list; `messages` is not changed)."""
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
    if last is None:
        raise ValueError("rag_messages: the conversation has no user message")
    out[last]["content"] = rag_question(out[last]["content"], hits)
    return out


def last_user_text(messages: list[dict]) -> str:
    """The query retrieval searches for: the last user message's text ('' when there is none)."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
