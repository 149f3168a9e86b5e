"""Prompts of the systems compared: the plain training prompt, plus few-shot pairs and retrieved passages.

A system without add-ons is asked exactly as training rendered the question (`render_prompt`). `+fewshot` puts
k TRAINING pairs before the question, rendered the way the model was taught: chat templates get them as
earlier user/assistant turns, string templates as whole rendered examples (prompt + answer) in a row
(`data/render.py: render_fewshot`, which serve uses for a conversation's earlier turns too). The shots are
chosen from the training split only (never a test pair) and never include the question's own pair (a probe
question is a training pair; showing its answer would turn few-shot into lookup). `+rag` puts the retrieved
passages into the messages through `retrieve.prompt.rag_messages`, the one place that does so (serve uses it
too). A prompt longer than the model's context drops shots, least relevant first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tunesmith.config import UserError
from tunesmith.data.formats import Example, Template, as_messages, prompt_key
from tunesmith.data.render import render_fewshot, render_prompt


def fewshot_choice(
    train_keys: Sequence[str],
    question_keys: Sequence[str],
    own: Sequence[int | None],
    k: int,
    select: str,
    seed: int,
    embedder=None,
) -> list[list[int]]:
    """Per question, the indices of its k training shots in prompt order (the most relevant last).

    `own[i]` is question i's own training index (probe questions) or None; it is never a shot. random: one
    seeded shuffle of the training split, each question takes the first k of it that are not its own pair (so
    every test question sees the same shots). nearest: the k training questions closest to it by embedding.

    >>> fewshot_choice(["a", "b", "c"], ["q", "r"], [None, 0], 2, "random", seed=0)
    [[0, 2], [2, 1]]
    """
    if select == "nearest":
        return _nearest(train_keys, question_keys, own, k, embedder)
    order = list(range(len(train_keys)))
    random.Random(seed).shuffle(order)
    return [[j for j in order if j != mine][:k] for mine in own]


def _nearest(
    train_keys: Sequence[str], question_keys: Sequence[str], own: Sequence[int | None], k: int, embedder
) -> list[list[int]]:
    """The k training questions with the highest cosine similarity, least similar first (nearest last)."""
    if embedder is None:
        raise UserError(
            "eval.fewshot.select=nearest: no embedding model to rank training pairs "
            "(set eval.embedding_model, or eval.fewshot.select=random)"
        )
    import numpy as np

    if not question_keys:
        return []
    sims = embedder.encode(list(question_keys)) @ embedder.encode(list(train_keys)).T  # (Q, N) cosine
    for i, mine in enumerate(own):
        if mine is not None:
            sims[i, mine] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (Q, k), nearest first
    return [[int(j) for j in reversed(row) if np.isfinite(sims[i, j])] for i, row in enumerate(top)]


def question_messages(example: Example) -> list[dict[str, str]]:
    """The conversation up to the answer: every turn but a final assistant one."""
    messages = list(as_messages(example))
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def chat_messages(example: Example, shots: Sequence[Example], hits: list | None) -> list[dict[str, str]]:
    """A chat prompt's messages: a leading system turn, the shots as earlier turns, the question (+ RAG)."""
    messages = question_messages(example)
    if hits is not None:
        from tunesmith.retrieve.prompt import rag_messages

        messages = rag_messages(messages, hits)
    lead = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = [m for s in shots for m in as_messages(s) if m["role"] != "system"]
    return lead + turns + messages[len(lead) :]


def _string_question(example: Example, template: Template, hits: list | None) -> Example:
    """The question under a string template; with passages, they join the question field."""
    if hits is None:
        return example
    from tunesmith.retrieve.prompt import last_user_text, rag_messages

    user = last_user_text(rag_messages(question_messages(example), hits))  # the question serve renders
    fields = dict(example.fields)
    if "question" in fields:
        fields["question"] = user
    else:  # alpaca: as_messages folded the input into the user turn, so it now lives in the instruction
        fields.update(instruction=user, input="")
    return Example(where=example.where, fields=fields)


def prompt_for(
    example: Example, template: Template, tok, shots: Sequence[Example], hits: list | None
) -> list[int]:
    """Prompt ids for one question with these shots and passages (none: exactly the training prompt)."""
    if not shots and hits is None:
        return render_prompt(example, template, tok)
    if template.kind == "chat":
        messages = chat_messages(example, shots, hits)
        return render_prompt(Example(where=example.where, messages=messages), template, tok)
    return render_fewshot(shots, _string_question(example, template, hits), template, tok)


def fitted_prompt(
    example: Example,
    template: Template,
    tok,
    shots: Sequence[Example],
    hits: list | None,
    budget: int | None,
) -> tuple[list[int], int]:
    """(prompt ids, shots dropped): drop the least relevant shot (the first) until it fits `budget`."""
    shots = list(shots)
    dropped = 0
    while True:
        ids = prompt_for(example, template, tok, shots, hits)
        if budget is None or len(ids) <= budget or not shots:
            return ids, dropped
        shots, dropped = shots[1:], dropped + 1


def shot_keys(examples: Sequence[Example]) -> list[str]:
    """What few-shot selection compares: each example's prompt text (its question)."""
    return [prompt_key(ex) for ex in examples]
