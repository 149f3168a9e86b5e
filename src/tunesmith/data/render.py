"""render: the only place that turns text into ids and decides which ids carry loss.

Prompt tokens get label -100; response tokens and the final EOS carry their ids. EOS is appended and
learned even when pad == eos, because padding is masked by position in the collators, never by token id.
The prompt and the response are tokenized separately, so the prompt ids seen in training are exactly
the ids `render_prompt` produces at inference time.

Truncation at data.max_length (`data.truncation`) keeps that contract: see data/truncate.py.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tunesmith.config import UserError
from tunesmith.data.encode import encode_batch, plain_backend, prompt_ids
from tunesmith.data.formats import Example, Template, as_messages, prompt_text
from tunesmith.data.rejects import Rejects
from tunesmith.data.truncate import CONTENT, PROMPT, RESPONSE, Cut, cut_content, slots, truncate

IGNORE = -100


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("tokenizer has no eos_token: set one on the model's tokenizer so answers can end")
    return tokenizer.eos_token_id


def render(
    examples: list[Example],
    template: Template,
    tokenizer,
    max_length: int,
    truncation: str,
    rejects: Rejects,
    cuts: list[Cut] | None = None,
) -> list[dict]:
    """Examples -> samples {input_ids, labels, where}; a row whose response does not survive a cut is bad.

    Each example cut at max_length is appended to `cuts` when given."""
    if not examples:
        return []
    cuts = [] if cuts is None else cuts
    if template.kind != "chat":
        with gc_paused():
            return _string_samples(examples, template, tokenizer, max_length, truncation, rejects, cuts)
    samples = []
    for ex in examples:
        ids, labels = _chat_ids(ex, tokenizer)
        if len(ids) > max_length:
            ids, labels = _cut_chat(ex, ids, labels, tokenizer, max_length, truncation, cuts)
        if all(label == IGNORE for label in labels):
            rejects.bad(ex.where, template.response_field, _no_response(max_length))
            continue
        samples.append({"input_ids": ids, "labels": labels, "where": ex.where})
    return samples


def _no_response(max_length: int) -> str:
    return (
        f"no response token survives truncation at data.max_length={max_length} "
        "(raise it or use data.truncation=prompt_left)"
    )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic GC while bulk data is built: reading and rendering keep every object made."""
    # They allocate a few containers per row and keep them all (no cycles), so each full collection they
    # trigger rescans everything built so far and frees nothing; paused, one collection runs later
    # (bench/data_prep.py, 50k rows: reading and rendering ~10% less CPU).
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _truncate_pair(
    ids: list[int], labels: list[int], max_length: int, side: str
) -> tuple[list[int], list[int]]:
    # The prompt is the leading run of -100 labels; for chat, later user turns stay inside the "response"
    # span (masked) so prompt_left cuts only the head of the conversation.
    n_prompt = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    p, r = truncate(ids[:n_prompt], ids[n_prompt:], max_length, side)
    lp, lr = truncate(labels[:n_prompt], labels[n_prompt:], max_length, side)
    return p + r, lp + lr


def _cut_chat(
    ex: Example, ids: list[int], labels: list[int], tokenizer, max_length: int, side: str, cuts: list[Cut]
) -> tuple[list[int], list[int]]:
    """An over-long chat sample cut to max_length: user content first under prompt_left (data/truncate.py)."""
    if side == "prompt_left":

        def encode(e: Example) -> list[int]:
            return _chat_template_ids(tokenizer, as_messages(e), add_generation_prompt=False)

        # _chat_ids may append an EOS or drop a tail after the last answer: a constant while answers
        # stay whole
        extra = len(ids) - len(encode(ex))
        spans = slots(ex, None)
        found = cut_content(
            ex, spans, encode, max_length - extra, _guess(ex, spans, len(ids) - max_length, tokenizer)
        )
        if found is not None:
            cut_ids, cut_labels = _chat_ids(found[0], tokenizer)
            if len(cut_ids) <= max_length and _learned(cut_labels) == _learned(labels):
                cuts.append(Cut(ex.where, CONTENT, len(ids)))
                return cut_ids, cut_labels
    cut_ids, cut_labels = _truncate_pair(ids, labels, max_length, side)
    cuts.append(Cut(ex.where, RESPONSE if _learned(cut_labels) != _learned(labels) else PROMPT, len(ids)))
    return cut_ids, cut_labels


def _learned(labels: list[int]) -> list[int]:
    return [label for label in labels if label != IGNORE]


def _guess(ex: Example, spans: list[tuple[int | str, int]], over: int, tokenizer) -> int:
    """Characters to cut so that about `over` tokens go: the length of the slots' first `over` tokens decoded.

    Usually exact (a value starts on a pre-token boundary), so the search only confirms it."""
    texts = [ex.messages[key]["content"] if isinstance(key, int) else ex.fields[key] for key, _ in spans]
    backend = plain_backend(tokenizer)
    # the Rust one skips the wrapper's overhead
    decode = backend.decode if backend is not None else tokenizer.decode
    c = 0
    for (_, limit), ids in zip(spans, encode_batch(tokenizer, texts, add_special_tokens=False)):
        if over < len(ids):
            return c + min(len(decode(ids[:over])), limit)
        c, over = c + limit, over - len(ids)
    return c


def _string_samples(
    examples: list[Example],
    template: Template,
    tokenizer,
    max_length: int,
    truncation: str,
    rejects: Rejects,
    cuts: list[Cut],
) -> list[dict]:
    eos = _eos_id(tokenizer)
    field = template.response_field
    # Batched calls into the Rust tokenizer, no per-token Python loops.
    p_ids = prompt_ids(examples, template, tokenizer)
    r_ids = encode_batch(tokenizer, [ex.fields[field] for ex in examples], add_special_tokens=False)
    samples = []
    if template.format == "text":
        # Raw text: every token carries loss; a long document becomes consecutive blocks, not a cut.
        for ex, ids in zip(examples, r_ids):
            ids.append(eos)
            for start in range(0, len(ids), max_length):
                block = ids[start : start + max_length]
                samples.append({"input_ids": block, "labels": list(block), "where": ex.where})
        return samples
    for ex, p, r in zip(examples, p_ids, r_ids):
        r.append(eos)  # r is this call's own list: the response ids + EOS, all learned
        if len(p) + len(r) > max_length:
            p, r = _cut_string(ex, template, tokenizer, p, r, max_length, truncation, cuts)
            if not r:  # only prompt tokens (label -100) are left
                rejects.bad(ex.where, field, _no_response(max_length))
                continue
        samples.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r, "where": ex.where})
    return samples


def _cut_string(
    ex: Example,
    template: Template,
    tokenizer,
    p: list[int],
    r: list[int],
    max_length: int,
    side: str,
    cuts: list[Cut],
) -> tuple[list[int], list[int]]:
    """An over-long (prompt, response+EOS) cut to max_length: user content first under prompt_left."""
    if side == "prompt_left" and len(r) < max_length:

        def encode(e: Example) -> list[int]:  # exactly render_prompt's ids
            return encode_batch(tokenizer, [prompt_text(e, template)], add_special_tokens=True)[0]

        spans = slots(ex, template)
        found = cut_content(
            ex, spans, encode, max_length - len(r), _guess(ex, spans, len(p) + len(r) - max_length, tokenizer)
        )
        if found is not None:
            cuts.append(Cut(ex.where, CONTENT, len(p) + len(r)))
            return found[1], r
    cut_p, cut_r = truncate(p, r, max_length, side)
    cuts.append(Cut(ex.where, RESPONSE if len(cut_r) < len(r) else PROMPT, len(p) + len(r)))
    return cut_p, cut_r


def _chat_ids(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    """Loss on assistant turns only, found by rendering growing prefixes (no {% generation %} tags needed).

    For assistant turn i: ids(messages[:i] + generation prompt) is a prefix of ids(messages[:i+1]); the
    tokens between the two are the assistant's answer including its end-of-turn token.
    """
    messages = as_messages(example)
    full = _chat_template_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _chat_template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _chat_template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise UserError(
                f"{example.where}: the chat template does not render turns as prefixes of the conversation; "
                "use a string data.template"
            )
        labels[len(prefix) : len(upto)] = full[len(prefix) : len(upto)]
    eos = _eos_id(tokenizer)
    last = max((j for j, label in enumerate(labels) if label != IGNORE), default=-1)
    if eos not in full[: last + 1][-3:]:
        # The chat template does not end the turn with EOS: append it so the model learns to stop.
        full, labels = full[: last + 1] + [eos], labels[: last + 1] + [eos]
    return full, labels


def _chat_template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if tokenizer.chat_template is None:
        raise UserError(
            "data.template=chat but the tokenizer has no chat_template (use a template string instead)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(example: Example, template: Template, tokenizer) -> list[int]:
    """The prompt ids for generation: exactly the prompt part that `render` produced in training."""
    if template.kind == "chat":
        messages = as_messages(example)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _chat_template_ids(tokenizer, messages, add_generation_prompt=True)
    text = prompt_text(example, template)
    return encode_batch(tokenizer, [text], add_special_tokens=True)[0] if text else []


# Between whole examples of a string template in one prompt: a blank line, as between paragraphs.
SHOT_SEPARATOR = "\n\n"


def render_fewshot(shots: Sequence[Example], question: Example, template: Template, tokenizer) -> list[int]:
    """String template: each shot whole (prompt + answer) and a blank line, then the question's prompt.

    The one few-shot rendering of string templates: compare's +fewshot and the earlier user/assistant turns
    of a served conversation (generate.conversation_ids) both go through it, so they give the same ids.
    """
    text = "".join(
        prompt_text(s, template) + s.fields[template.response_field] + SHOT_SEPARATOR for s in shots
    )
    return encode_batch(tokenizer, [text + prompt_text(question, template)], add_special_tokens=True)[0]
