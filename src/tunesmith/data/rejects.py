"""Bad-row policy: fail on the first bad row, or skip it and write every skipped row to a report.

Nothing is ever dropped silently: under `skip` each row lands in `<out_dir>/data_rejects.jsonl` with its
place (`file:line`), the field and the cause.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from tunesmith.config import UserError

REJECTS_FILE = "data_rejects.jsonl"
# Line breaks, other control characters and lone surrogates: what would break a one-line (or printable)
# message.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(s: str) -> str:
    """`s` with each line break or control character written as its escape: user text inside a one-line error.

    >>> one_line("role 'user\\nbot'")
    "role 'user\\\\nbot'"
    """
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], s)


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (library errors run to several lines), or its type's name."""
    lines = str(e).strip().splitlines()
    return one_line(lines[0]) if lines else type(e).__name__


class Rejects:
    """Collects bad rows under `skip`, raises a one-line UserError on the first under `fail`."""

    def __init__(self, policy: Literal["fail", "skip"] = "fail", out_dir: str | Path | None = None) -> None:
        if policy not in ("fail", "skip"):
            raise ValueError(f"policy must be 'fail' or 'skip' (got {policy!r})")
        self.policy = policy
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.items: list[dict] = []
        self._appended = 0  # items already appended to the report by append()

    def bad(self, where: str, field: str | None, cause: str, row: dict | None = None) -> None:
        """Report one bad row: raise under `fail`, record under `skip`."""
        where, cause = one_line(where), one_line(cause)  # causes quote the user's text (roles, columns)
        if self.policy == "fail":
            raise UserError(f"{where}: {cause} (use data.on_bad_row=skip to skip and report such rows)")
        self.record(where, field, cause, row)

    def record(self, where: str, field: str | None, cause: str, row: dict | None = None) -> None:
        """Record a dropped row under either policy (e.g. a duplicate data.dedupe removed): never raises."""
        self.items.append({"where": where, "field": field, "cause": cause, "row": row})

    @property
    def count(self) -> int:
        """Rows skipped so far."""
        return len(self.items)

    def write(self) -> Path | None:
        """Write every skipped row to `<out_dir>/data_rejects.jsonl`; None when there is no out_dir."""
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / REJECTS_FILE
        # backslashreplace: a lone surrogate in a rejected row is written as its JSON escape, not an error
        with path.open("w", encoding="utf-8", errors="backslashreplace") as f:
            for item in self.items:
                # default=str: a hub row can hold values json cannot encode (dates, bytes); keep the row
                f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
        return path

    def append(self) -> None:
        """Append the rows skipped since the last call to the report: a stream's rows arrive all run long."""
        if self.out_dir is None or self._appended == len(self.items):
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / REJECTS_FILE).open("a", encoding="utf-8", errors="backslashreplace") as f:
            for item in self.items[self._appended :]:
                f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
        self._appended = len(self.items)

    def note(self) -> str:
        """Where the skipped rows are listed, for an error message: ' (see runs/x/data_rejects.jsonl)'."""
        if self.out_dir is None:
            return " (no report without an out_dir; data.on_bad_row=fail stops at the first one and names it)"
        return f" (see {self.out_dir / REJECTS_FILE})"

    def summary(self) -> str:
        """One line for the console, e.g. '3 rows skipped (see runs/x/data_rejects.jsonl)'."""
        where = f" (see {self.out_dir / REJECTS_FILE})" if self.out_dir is not None else ""
        return f"{self.count} row{'s' if self.count != 1 else ''} skipped{where}"
