"""Cutting an example to data.max_length: what `render` may cut, and the search for the smallest cut.

`data.truncation` keeps render's contract (the prompt ids of a cut example are what inference renders):
- prompt_left (default) cuts inside the user content only, so a cut example still shows the system prompt,
  every role marker and the template's fixed text (`### Question:\n` ... `\n\n### Answer:\n`), as inference
  will. Chat: the user turns lose their head, oldest turn first (emptied before the next one is touched);
  string templates: the field values the prompt shows, longest value first, each down to its last
  character. The cut content is rendered again, so the prompt ids are `render_prompt` of the cut example.
  The response and EOS are kept whole. Only when the fixed parts + response do not fit even with the
  content cut does it fall back to the token cut below (prompt head first, then the response's end).
- left / right are plain token cuts of the rendered ids: left drops from the start (the system prompt and
  the template's leading text go first), right from the end (the EOS, the response, then the prompt's end).
`render(..., cuts=[])` records each cut example as a `Cut` (for `data inspect`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from string import Formatter

from tunesmith.data.formats import Example, Template, prompt_format

# More than this share of examples cut at max_length is a warning (data inspect, pre-flight): a few long
# outliers are normal; "more than a few percent" means the model trains on contexts or answers it will not
# see whole.
WARN_CUT_SHARE = 0.03


def truncate(
    prompt: list[int], response: list[int], max_length: int, side: str
) -> tuple[list[int], list[int]]:
    """Cut (prompt, response+eos) to max_length tokens: the token-level cut (`render` cuts content first).

    right: drop from the end; left: drop from the start; prompt_left: drop prompt tokens from the left
    (the answer survives), then, if the response alone is too long, drop its end.
    >>> truncate([1, 2, 3], [4, 5], 4, "prompt_left")
    ([2, 3], [4, 5])
    """
    over = len(prompt) + len(response) - max_length
    if over <= 0:
        return prompt, response
    if side == "right":
        keep = max_length - len(prompt)
        return (prompt[:max_length], []) if keep <= 0 else (prompt, response[:keep])
    if side == "left":
        return (prompt[over:], response) if over <= len(prompt) else ([], response[over - len(prompt) :])
    # prompt_left
    if over <= len(prompt):
        return prompt[over:], response
    return [], response[:max_length]


@dataclass(frozen=True)
class Cut:
    """An example cut at max_length: where it is, which part lost tokens, and its length before the cut."""

    where: str
    part: str  # CONTENT (fixed parts and response kept), PROMPT (the template's fixed text too) or RESPONSE
    length: int


CONTENT, PROMPT, RESPONSE = "user content", "prompt", "response"


def slots(ex: Example, template: Template | None) -> list[tuple[int | str, int]]:
    """What prompt_left may cut, in order: (message index or field name, how many leading characters may go).

    Chat messages: the user turns, oldest first, down to empty. Fields (template None: rendered as chat
    by `as_messages`): the values the prompt shows, longest first, each down to its last non-space
    character, so the row keeps its prompt (Alpaca's depends on an empty `input`) and stays a valid row.
    """
    if ex.messages is not None:
        return [(i, len(m["content"])) for i, m in enumerate(ex.messages) if m["role"] == "user"]
    if template is None:
        names = ["question"] if "question" in ex.fields else ["instruction", "input"]
    else:
        names = [name for _, name, _, _ in Formatter().parse(prompt_format(ex, template)) if name]
    values = {n: ex.fields.get(n) for n in dict.fromkeys(names)}
    slots = [(n, len(v.rstrip()) - 1) for n, v in values.items() if isinstance(v, str) and v.strip()]
    return sorted(slots, key=lambda slot: -len(ex.fields[slot[0]]))


def with_cut(ex: Example, slots: list[tuple[int | str, int]], c: int) -> Example:
    """`ex` with `c` leading characters cut from its slots, in slot order."""
    fields = dict(ex.fields)
    messages = None if ex.messages is None else [dict(m) for m in ex.messages]
    for key, limit in slots:
        take = min(c, limit)
        c -= take
        if isinstance(key, int):
            messages[key]["content"] = messages[key]["content"][take:]
        else:
            fields[key] = fields[key][take:]
    return Example(ex.where, fields, messages)


def cut_content(
    ex: Example,
    slots: list[tuple[int | str, int]],
    encode: Callable[[Example], list[int]],
    budget: int,
    guess: int,
) -> tuple[Example, list[int]] | None:
    """The example with the least user content cut whose `encode` fits `budget` tokens, and those ids.

    None when even all the content of `slots` is not enough. `guess`: the characters to cut that the
    search starts from."""
    total = sum(limit for _, limit in slots)
    seen: dict[int, list[int]] = {}

    def fits(c: int) -> bool:
        if c not in seen:
            seen[c] = encode(with_cut(ex, slots, c))
        return len(seen[c]) <= budget

    c = smallest_fitting(fits, total, guess) if total else None
    return None if c is None else (with_cut(ex, slots, c), seen[c])


def smallest_fitting(fits: Callable[[int], bool], total: int, guess: int) -> int | None:
    """A cut c in (0, total] with fits(c), not fits(c - 1) (0: the over-long one); None if not fits(total).

    Walks from `guess` in doubling steps until the answer is bracketed, then bisects: with a good guess, two
    probes. Token counts are not quite monotone in the characters cut (BPE merges at the cut), so this is
    the boundary nearest the guess, not always the smallest cut; it always fits.
    """
    lo, hi, step = 0, None, 1  # not fits(lo); fits(hi) once hi is set
    c = min(max(guess, 1), total)
    while hi is None:
        if fits(c):
            hi = c
        elif c == total:
            return None
        else:
            lo, c, step = c, min(total, c + step), step * 2
    step = 1
    while lo == 0 and hi - step > 0:  # the guess fitted: walk down until a cut does not
        if not fits(hi - step):
            lo = hi - step
        else:
            hi, step = hi - step, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
