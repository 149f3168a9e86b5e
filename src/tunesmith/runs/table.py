"""`tunesmith runs [DIR]`: every run dir under DIR as one Rich table (or JSON), sorted and filtered."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from tunesmith.config import UserError
from tunesmith.runs.scan import ROW_KEYS, scan

STATUS_STYLE = {
    "finished": "green",
    "interrupted": "yellow",
    "failed": "red",
    "running": "cyan",
    "unreadable": "magenta",
}


def parse_filters(filters: list[str]) -> list[tuple[str, str]]:
    """['status=finished', 'model=*neox*'] -> [(key, pattern)]; UserError on a bad one."""
    out = []
    for f in filters:
        key, sep, pattern = f.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"runs --filter {f!r}: expected key=value, e.g. status=finished")
        _check_key(key, "--filter")
        out.append((key, pattern.strip()))
    return out


def _check_key(key: str, flag: str) -> None:
    if key not in ROW_KEYS:
        raise UserError(f"runs {flag} {key!r}: no such column (one of: {', '.join(ROW_KEYS)})")


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def matches(row: dict, key: str, pattern: str) -> bool:
    """A value equals the pattern as a number (lr=3e-3 matches 0.003), or as text with shell wildcards."""
    value = row.get(key)
    want, got = _number(pattern), _number(value)
    if want is not None and got is not None and not isinstance(value, bool):
        return want == got
    text = "null" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)
    return fnmatch.fnmatchcase(text, pattern)


def select(rows: list[dict], filters: list[str], sort: str | None, desc: bool = False) -> list[dict]:
    """Rows matching every key=value filter, sorted by `sort` (missing values last, whatever the order)."""
    for key, pattern in parse_filters(filters):
        rows = [r for r in rows if matches(r, key, pattern)]
    if sort is None:
        return rows
    _check_key(sort, "--sort")
    present = [r for r in rows if r.get(sort) is not None]
    numeric = all(isinstance(r[sort], (int, float)) for r in present)
    present.sort(key=lambda r: r[sort] if numeric else str(r[sort]), reverse=desc)
    return present + [r for r in rows if r.get(sort) is None]


def _f(v: Any, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _pair(row: dict, key: str) -> str:
    """'tuned / base' for a headline metric."""
    tuned, base = row.get(f"tuned_{key}"), row.get(f"base_{key}")
    return "—" if tuned is None and base is None else f"{_f(tuned, '.3f')}/{_f(base, '.3f')}"


def _model(name: Any) -> str:
    """A local path shows its last part (runs' parent dirs are long); a hub id shows whole."""
    if not isinstance(name, str):
        return "—"
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def _cells(r: dict) -> list[str]:
    """Table cells (plain text): related values share a cell, a line each, so the table fits a terminal."""
    length = f"{r['max_steps']} steps" if r.get("max_steps") else f"{_f(r['epochs'], 'g')} epochs"
    method = "" if r.get("lora") is None else f"lora r{r['lora_r']}" if r["lora"] else "full"
    batch = f"batch {r['batch_size']}x{r['grad_accum']}" if r.get("batch_size") else ""
    hyper = [f"lr {_f(r['lr'], '.2g')}", length, batch, method, r.get("precision") or ""]
    steps = _f(r["steps"]) + (f"/{r['total_steps']}" if r.get("total_steps") else "")
    tps = "" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f} tok/s"
    best = "—" if r.get("best_eval_loss") is None else f"{r['best_eval_loss']:.4f} @{r['best_eval_step']}"
    headline = [
        f"{label} {_pair(r, key)}"
        for key, label in (("token_f1", "F1"), ("rouge_l", "ROUGE-L"), ("probe_recall", "probe"))
        if _pair(r, key) != "—"
    ]
    return [
        r["name"],
        str(r["status"]),
        f"{_model(r.get('model'))}\ndata {(r.get('data_hash') or '—')[:8]}",
        "\n".join(x for x in hyper if x) if r.get("lr") is not None else "—",
        f"{steps}\n{tps}".strip(),
        f"{best}\n{_f(r.get('final_eval_loss'))}",
        "\n".join(headline) or "—",
    ]


# (header, justify, min_width): a status is never broken over two lines
COLUMNS = (
    ("run", "left", None),
    ("status", "left", 11),
    ("model, data", "left", None),
    ("config", "left", None),
    ("steps", "right", None),
    ("eval loss:\nbest, final", "left", None),
    ("tuned/base", "left", None),
)


def print_runs(rows: list[dict], root: Path, console: Any) -> None:
    """The runs as one Rich table; each row's reason (why failed, what is unreadable) as a note below it."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    if not rows:
        console.print(f"no run dirs under {escape(str(root))} (a run dir holds manifest.json or config.yaml)")
        return
    # no vertical rules: the columns get the width (a row per run, a rule between runs)
    table = Table(
        title=f"runs in {escape(str(root))}", header_style="bold", box=box.SIMPLE_HEAD, show_lines=True
    )
    for header, justify, min_width in COLUMNS:
        table.add_column(header, justify=justify, min_width=min_width, overflow="fold")
    for r in rows:
        cells = [escape(c) for c in _cells(r)]
        style = STATUS_STYLE.get(r["status"])
        cells[1] = f"[{style}]{cells[1]}[/{style}]" if style else cells[1]
        table.add_row(*cells)
    console.print(table)
    for r in rows:
        if r.get("reason"):
            console.print(f"{escape(r['name'])}: {r['status']}: {escape(r['reason'])}", soft_wrap=True)


def runs_cli(
    root: Path, sort: str | None, desc: bool, filters: list[str], as_json: bool, console: Any
) -> None:
    """`tunesmith runs`: scan, filter, sort, then a table or a JSON list of rows (ROW_KEYS, in that order)."""
    rows = select(scan(root), filters, sort, desc)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_runs(rows, root, console)
