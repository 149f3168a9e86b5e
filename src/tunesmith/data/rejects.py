"""Bad-row policy: fail on the first bad row, or skip it and write every skipped row to a report.

Nothing is ever dropped silently: under `skip` each row lands in `<out_dir>/data_rejects.jsonl` with its
place (`file:line`), the field and the cause.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from tunesmith.config import UserError

REJECTS_FILE = "data_rejects.jsonl"


class Rejects:
    """Collects bad rows under `skip`, raises a one-line UserError on the first under `fail`."""

    def __init__(self, policy: Literal["fail", "skip"] = "fail", out_dir: str | Path | None = None) -> None:
        if policy not in ("fail", "skip"):
            raise ValueError(f"policy must be 'fail' or 'skip' (got {policy!r})")
        self.policy = policy
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.items: list[dict] = []

    def bad(self, where: str, field: str | None, cause: str, row: dict | None = None) -> None:
        """Report one bad row: raise under `fail`, record under `skip`."""
        if self.policy == "fail":
            raise UserError(f"{where}: {cause} (use data.on_bad_row=skip to skip and report such rows)")
        self.record(where, field, cause, row)

    def record(self, where: str, field: str | None, cause: str, row: dict | None = None) -> None:
        """Record a dropped row under either policy (e.g. a duplicate removed by data.dedupe): never raises."""
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
        with path.open("w", encoding="utf-8") as f:
            for item in self.items:
                # default=str: a hub row can hold values json cannot encode (dates, bytes); keep the row anyway
                f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
        return path

    def summary(self) -> str:
        """One line for the console, e.g. '3 rows skipped (see runs/x/data_rejects.jsonl)'."""
        where = f" (see {self.out_dir / REJECTS_FILE})" if self.out_dir is not None else ""
        return f"{self.count} row{'s' if self.count != 1 else ''} skipped{where}"
