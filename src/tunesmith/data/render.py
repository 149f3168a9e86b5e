"""render: the only place that turns text into ids and decides which ids carry loss.

Prompt tokens get label -100; response tokens and the final EOS carry their ids. EOS is appended and
learned even when pad == eos, because padding is masked by position in the collators, never by token id.
The prompt and the response are tokenized separately, so the prompt ids seen in training are exactly
the ids `render_prompt` produces at inference time.

Truncation at data.max_length (`data.truncation`) keeps that contract: see data/truncate.py.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from string import Formatter

from tunesmith.config import UserError
from tunesmith.data.formats import Example, Template, as_messages, prompt_format, prompt_text
from tunesmith.data.rejects import Rejects
from tunesmith.data.truncate import CONTENT, PROMPT, RESPONSE, Cut, cut_content, slots, truncate

IGNORE = -100
_ENCODE_CHUNK = 1000  # texts per call into the Rust tokenizer


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
    """Examples -> samples {input_ids, labels, where}; a row whose response does not survive truncation is bad.

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
    return f"no response token survives truncation at data.max_length={max_length} (raise it or use data.truncation=prompt_left)"


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic GC while bulk data is built: reading and rendering keep every object they make."""
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
    """An over-long chat sample cut to max_length: user content first under prompt_left (see data/truncate.py)."""
    if side == "prompt_left":

        def encode(e: Example) -> list[int]:
            return _chat_template_ids(tokenizer, as_messages(e), add_generation_prompt=False)

        # _chat_ids may append an EOS or drop a tail after the last answer: a constant while answers stay whole
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
    """Characters to cut so that about `over` tokens go: the length of the slots' first `over` tokens, decoded.

    Usually exact (a value starts on a pre-token boundary), so the search only confirms it."""
    texts = [ex.messages[key]["content"] if isinstance(key, int) else ex.fields[key] for key, _ in spans]
    backend = _plain_backend(tokenizer)
    decode = (
        backend.decode if backend is not None else tokenizer.decode
    )  # the Rust one skips the wrapper's overhead
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


def encode_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The ids of each text, exactly `tokenizer(texts, add_special_tokens=...)["input_ids"]`, but faster.

    transformers' wrapper asks the Rust tokenizer for offsets and builds attention masks and a
    BatchEncoding, Python lists per row, that render never reads (about half of its time). When the
    wrapper would only pass the texts through, the Rust backend is called directly.
    """
    backend = _plain_backend(tokenizer)
    if backend is None:  # slow (Python) tokenizer, or backend state the wrapper would change per call
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    encode = getattr(
        backend, "encode_batch_fast", backend.encode_batch
    )  # _fast: tokenizers >= 0.20, no offsets
    ids: list[list[int]] = []
    # Chunks, not one call: each Rust Encoding holds ~10 vectors per token, and 50k of them alive at once
    # cost ~25% more CPU (fresh memory) than chunks of 1000 whose memory is reused.
    for start in range(0, len(texts), _ENCODE_CHUNK):
        ids.extend(
            [
                e.ids
                for e in encode(texts[start : start + _ENCODE_CHUNK], add_special_tokens=add_special_tokens)
            ]
        )
    return ids


def prompt_ids(examples: list[Example], template: Template, tokenizer) -> list[list[int]]:
    """Each example's prompt ids, exactly `encode_batch(tokenizer, [prompt_text(...)], True)`, fixed text encoded once.

    The template's fixed text is ~25% of a QA prompt's tokens. Where splitting a prompt into its fixed
    pieces and field values falls on pre-token boundaries (`_split_plan`), BPE never merges across the
    split and the pieces' ids concatenate to the whole prompt's ids; every other row is encoded whole.
    """
    if template.format == "text":
        return [[] for _ in examples]
    backend = _plain_backend(tokenizer)
    specials = _special_tokens_around(backend) if backend is not None else None
    formats = [prompt_format(ex, template) for ex in examples]
    plans = {f: _split_plan(f, backend, specials) for f in set(formats)} if specials is not None else {}
    split = [plans.get(f) is not None and plans[f].fits(ex.fields) for ex, f in zip(examples, formats)]
    whole = [prompt_text(ex, template) for ex, s in zip(examples, split) if not s]
    values = [
        ex.fields[name] for ex, f, s in zip(examples, formats, split) if s for _, name in plans[f].fields
    ]
    whole_ids = iter(encode_batch(tokenizer, whole, add_special_tokens=True))
    value_ids = iter(encode_batch(tokenizer, values, add_special_tokens=False))
    out = []
    for f, s in zip(formats, split):
        if not s:
            out.append(next(whole_ids))
            continue
        ids = list(plans[f].pieces[0])
        for piece in plans[f].pieces[1:]:
            ids += next(value_ids)
            ids += piece
        out.append(ids)
    return out


# Junction rules a field value must meet (bit flags): its first / last character is not whitespace.
_START, _END = 1, 2


class _Plan:
    """A prompt format split at its fields: pieces[0] + value_0 + pieces[1] + ... + pieces[-1] (pieces are ids)."""

    def __init__(self, pieces: list[list[int]], fields: list[tuple[int, str]]):
        self.pieces, self.fields = (
            pieces,
            fields,
        )  # fields: (junction rules, name); one piece more than fields

    def fits(self, values: dict) -> bool:
        """Whether this row's values meet the junction rules (and exist: a missing one is reported by prompt_text)."""
        for rule, name in self.fields:
            v = values.get(name)
            if (
                not isinstance(v, str)
                or not v
                or (rule & _START and v[0].isspace())
                or (rule & _END and v[-1].isspace())
            ):
                return False
        return True


def _split_plan(fmt: str, backend, specials: tuple[list[int], list[int]]) -> _Plan | None:
    """The split of a format string into encoded fixed pieces and fields, or None where it is not proven exact.

    For GPT-2's byte-level split regex, which has no lookbehind (a pre-token boundary at k leaves the
    pre-tokens after k those of the text after k alone):
    - fixed text, then a field: the text ends in one line break or tab after a non-space (`:\n`) and the
      value starts with a non-space: that character is a pre-token of its own in the piece and in the whole;
    - a field, then fixed text: the value ends with a non-space and the text starts with whitespace: no
      pattern runs from a non-space into whitespace.
    Adjacent fields and format specs (`{x:>3}`) are not split.
    """
    parsed = list(Formatter().parse(fmt))
    lits = [lit for lit, *_ in parsed]
    names = [name for _, name, _, _ in parsed if name is not None]
    if any(spec or conv or not name.isidentifier() for _, name, spec, conv in parsed if name is not None):
        return None
    if len(lits) == len(names):
        lits.append("")
    fields = []
    for i, name in enumerate(names):
        before, after, rule = lits[i], lits[i + 1], 0
        if i > 0 or before:  # a value at the very start has its own pre-tokens in the whole too
            if not before or before[-1] not in "\n\t" or (len(before) > 1 and before[-2].isspace()):
                return None
            rule |= _START
        if after:
            if after[0] not in " \n\t":
                return None
            rule |= _END
        fields.append((rule, name))
    pre, post = specials
    pieces = [backend.encode(lit, add_special_tokens=False).ids for lit in lits]
    pieces[0], pieces[-1] = pre + pieces[0], pieces[-1] + post
    return _Plan(pieces, fields)


def _special_tokens_around(backend) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) add_special_tokens puts around a text; None where `_split_plan`'s proof does not hold."""
    state = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    parts = state.get("pretokenizers", [state])
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or not byte_level[0]["use_regex"] or byte_level[0]["add_prefix_space"]:
        return None
    if any(p.get("type") not in ("ByteLevel", "Digits") for p in parts) or getattr(
        backend.model, "dropout", None
    ):
        return None  # Digits only splits further (never at a line break); BPE dropout is random per call
    if backend.normalizer is not None and json.loads(backend.normalizer.__getstate__()).get("type") != "NFC":
        return None  # NFC never composes with a line break or tab; other normalizers are not checked
    for tok in backend.get_added_tokens_decoder().values():
        if tok.lstrip or tok.rstrip or any(c.isspace() for c in tok.content):
            return None  # such an added token could match across a piece boundary
    processor = (
        json.loads(backend.post_processor.__getstate__()) if backend.post_processor is not None else {}
    )
    if processor.get("type", "ByteLevel") not in ("TemplateProcessing", "ByteLevel"):
        return None  # those two add the same ids around any single text
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
    return None if at is None else (full[:at], full[at + len(bare) :])


def _plain_backend(tokenizer):
    """The Rust tokenizer when calling it equals calling the wrapper with defaults, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return (
            None  # the wrapper resets truncation/padding for a default call; reproduce that via the wrapper
        )
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    if hasattr(tokenizer, "_switch_to_input_mode"):
        return None  # seq2seq tokenizers swap their post-processor per call
    return backend


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
                f"{example.where}: the chat template does not render turns as prefixes of the conversation; use a string data.template"
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
