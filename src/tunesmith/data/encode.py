"""Text -> ids exactly as transformers' tokenizer wrapper gives them, at the Rust tokenizer's speed.

`encode_batch` calls the Rust backend directly whenever the wrapper would only pass the texts through;
`prompt_ids` encodes a string template's fixed text once per format and only the field values per row,
where a byte-level pre-tokenizer provably splits the prompt at the same places. data/render.py builds
samples from these ids; tests/test_render_encode.py checks them against the wrapper on many texts.
"""

from __future__ import annotations

import json
from string import Formatter

from tunesmith.data.formats import Example, Template, prompt_format, prompt_text

_ENCODE_CHUNK = 1000  # texts per call into the Rust tokenizer


def encode_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The ids of each text, exactly `tokenizer(texts, add_special_tokens=...)["input_ids"]`, but faster.

    transformers' wrapper asks the Rust tokenizer for offsets and builds attention masks and a
    BatchEncoding, Python lists per row, that render never reads (about half of its time). When the
    wrapper would only pass the texts through, the Rust backend is called directly.
    """
    backend = plain_backend(tokenizer)
    if backend is None:  # slow (Python) tokenizer, or backend state the wrapper would change per call
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    # _fast: tokenizers >= 0.20, no offsets
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
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
    """Prompt ids of each example, exactly `encode_batch(tok, [prompt_text(...)], True)`; fixed text once.

    The template's fixed text is ~25% of a QA prompt's tokens. Where splitting a prompt into its fixed
    pieces and field values falls on pre-token boundaries (`_split_plan`), BPE never merges across the
    split and the pieces' ids concatenate to the whole prompt's ids; every other row is encoded whole.
    """
    if template.format == "text":
        return [[] for _ in examples]
    backend = plain_backend(tokenizer)
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
    """A prompt format split at its fields: pieces[0] + value_0 + pieces[1] + ... + pieces[-1], as ids."""

    def __init__(self, pieces: list[list[int]], fields: list[tuple[int, str]]):
        # fields: (junction rules, name); one piece more than fields
        self.pieces, self.fields = pieces, fields

    def fits(self, values: dict) -> bool:
        """Whether this row's values meet the junction rules (and exist: prompt_text reports one missing)."""
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
    """The split of a format string into encoded fixed pieces and fields, or None where not proven exact.

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
    """(ids before, ids after) that add_special_tokens puts around a text; None where `_split_plan` fails."""
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


def plain_backend(tokenizer):
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
