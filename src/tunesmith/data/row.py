"""Row: what every reader yields: one raw record and its place (`file:line`, `file:row N`, `id[split]:row N`).

The place is what a bad row is reported by.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One raw record and where it came from (`file:line`, `file:row N`, ...)."""

    where: str
    fields: dict
