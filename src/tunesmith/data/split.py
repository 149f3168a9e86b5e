"""Train/test split decided by a hash of (seed, normalized prompt): stable when rows are added or reordered.

Each example's side depends only on its own key, never on its position or on the other rows, so adding
rows to a dataset never moves an existing example from train to test (fraction mode). Examples whose
prompts normalize to the same text land on the same side, so an exact duplicate cannot leak.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import TypeVar

from tunesmith.config import UserError

T = TypeVar("T")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace: the text that decides 'same'.

    >>> normalize_text("  What's   the Q3 revenue?\\n")
    'whats the q3 revenue'
    """
    s = unicodedata.normalize("NFKC", s).lower()
    return _SPACE.sub(" ", _PUNCT.sub("", s)).strip()


def split_hash(key: str, seed: int) -> int:
    """A 64-bit hash of (seed, normalized key); uniform, and the same in every process and Python version."""
    digest = hashlib.blake2b(f"{seed}\x00{normalize_text(key)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split(
    examples: list[T], test_size: float, seed: int, key: Callable[[T], str], name: str = "data"
) -> tuple[list[T], list[T]]:
    """(train, test): test_size < 1 is a fraction, >= 1 a count; order within each side is kept.

    Fraction: an example goes to test when hash / 2**64 < test_size (independent of the other rows).
    Count: the examples with the `count` smallest hashes (ties of the same prompt stay together).
    A split that leaves either side empty is a UserError starting with `name` (the data file).
    >>> split(["a", "b", "c"], 0, 1, str)
    (['a', 'b', 'c'], [])
    """
    if test_size <= 0 or not examples:
        return list(examples), []
    hashes = [split_hash(key(ex), seed) for ex in examples]
    if test_size < 1:
        cut = int(test_size * 2**64)
        if not any(h < cut for h in hashes) and len(set(hashes)) > 1:
            # A tiny dataset can hash nothing below the cut; hold out the smallest key rather than nothing.
            cut = min(hashes) + 1
    else:
        count = int(test_size)
        distinct = sorted(set(hashes))
        if count >= len(examples) or count >= len(distinct):
            raise UserError(
                f"{name}: data.test_size={count} would leave no training examples "
                f"({len(examples)} examples, {len(distinct)} distinct prompts); lower it"
            )
        # Take whole groups of the same prompt until `count` examples are in: a group never straddles the cut.
        taken, cut = 0, 0
        sizes = {}
        for h in hashes:
            sizes[h] = sizes.get(h, 0) + 1
        for h in distinct:
            if taken >= count:
                break
            taken += sizes[h]
            cut = h + 1
    train = [ex for ex, h in zip(examples, hashes, strict=True) if h >= cut]
    test = [ex for ex, h in zip(examples, hashes, strict=True) if h < cut]
    if not train:
        raise UserError(
            f"{name}: data.test_size={test_size:g} leaves no training examples "
            f"({len(examples)} in all); lower it"
        )
    if not test:  # one example, or every prompt the same: a held-out split was asked for and none came out
        same = ", all with the same prompt" if len(examples) > 1 else ""
        raise UserError(
            f"{name}: data.test_size={test_size:g} of {len(examples)} "
            f"example{'s' if len(examples) > 1 else ''}{same} leaves 0 test examples "
            "(use a larger file, a count such as data.test_size=1, "
            "or data.test_size=0 to train without a held-out split)"
        )
    return train, test
