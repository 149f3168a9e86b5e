"""The evaluation report: one self-contained report.html (PNG plots inlined as data URIs) plus the PNG files,
and the same summary as a Rich table in the terminal.

Inputs are what compare/eval write: metrics.json `{"base": {name: value}, "tuned": {...}, "delta": {...},
"notes": [...]}` (either side may be missing for a single-model eval) and prediction rows
`{"prompt", "question", "reference", "base": {"answer", "metrics", "buckets"}, "tuned": {...}}`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tunesmith.eval.buckets import BUCKETS, bucket_counts

SIDES = ("base", "tuned")
# Metrics where a drop is an improvement; bucket counts (flattened as "buckets.<name>") are too.
LOWER_IS_BETTER = {"loss", "perplexity", "question_overlap", "judge_failed"}
# Metrics that describe answers without being better or worse when they move.
NEUTRAL = {"n", "answer_words"}
# Per-example score used to rank improvements/regressions, first one present wins.
EXAMPLE_SCORES = ("rouge_l", "token_f1", "exact_match")
N_EXAMPLES = 10
COLORS = {"base": "#8c8c8c", "tuned": "#1f77b4", "reference": "#2ca02c"}

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;width:100%}th,td{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}.ex td{white-space:pre-wrap;
font-size:.9em;max-width:320px}img{max-width:100%;margin:.5em 0}.note{color:#666}"""


def direction(name: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when the metric is descriptive."""
    if name in NEUTRAL:
        return 0
    if name in LOWER_IS_BETTER or name.startswith(("buckets.", "bucket_")):
        return -1
    return 1


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'buckets': {'empty': 2}} -> {'buckets.empty': 2}; non-numeric leaves dropped."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            out[prefix + k] = v
    return out


def sides_of(metrics: dict) -> list[str]:
    """The models present in metrics.json, in base/tuned order."""
    return [s for s in SIDES if metrics.get(s)]


def summary_rows(metrics: dict) -> list[dict]:
    """One row per metric: name, the value of each side, delta (tuned - base) and whether it improved."""
    sides = sides_of(metrics)
    flat = {s: _flat(metrics[s]) for s in sides}
    deltas = _flat(metrics.get("delta") or {})
    names = list(dict.fromkeys(k for s in sides for k in flat[s]))
    rows = []
    for name in names:
        row: dict[str, Any] = {"metric": name, **{s: flat[s].get(name) for s in sides}}
        if len(sides) == 2:
            base, tuned = row["base"], row["tuned"]
            delta = deltas.get(name)
            if delta is None and base is not None and tuned is not None:
                delta = tuned - base
            row["delta"] = delta
            sign = 0 if not delta else (1 if delta > 0 else -1)
            row["verdict"] = {1: "better", -1: "worse", 0: ""}[sign * direction(name)] if sign else ""
        rows.append(row)
    return rows


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:+d}" if signed else str(v)
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def _arrow(row: dict) -> str:
    delta = row.get("delta")
    if not delta:
        return ""
    return ("▲" if delta > 0 else "▼") + (f" {row['verdict']}" if row["verdict"] else "")


def print_summary(metrics: dict, console: Any) -> None:
    """Print the summary as a Rich table (green when a metric got better, red when worse) and the notes."""
    from rich.table import Table

    sides = sides_of(metrics)
    two = len(sides) == 2
    table = Table(title="evaluation" + (": base vs tuned" if two else f": {sides[0]}" if sides else ""))
    table.add_column("metric")
    for s in sides:
        table.add_column(s, justify="right")
    if two:
        table.add_column("delta", justify="right")
    for row in summary_rows(metrics):
        cells = [row["metric"], *(_fmt(row[s]) for s in sides)]
        if two:
            style = {"better": "green", "worse": "red"}.get(row["verdict"], "")
            text = f"{_fmt(row['delta'], signed=True)} {_arrow(row)}".strip()
            cells.append(f"[{style}]{text}[/{style}]" if style else text)
        table.add_row(*cells)
    console.print(table)
    for note in metrics.get("notes") or []:
        console.print(f"note: {note}")


# ---------------------------------------------------------------- plots (matplotlib's Figure API renders
# PNGs through Agg without touching pyplot's global backend state, so it is safe in servers and tests)


def _png(fig: Any, path: Path) -> str:
    """Save the figure to `path` and return it as a data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    path.write_bytes(buf.getvalue())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _metric_bars(rows: list[dict], sides: list[str], path: Path) -> str | None:
    """One small panel per metric (scales differ: BLEU 0-100, F1 0-1, loss), a bar per model."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["metric"] != "n" and any(r[s] is not None for s in sides)]
    if not rows:
        return None
    cols = min(4, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig = Figure(figsize=(3.0 * cols, 2.4 * nrows))
    for i, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        values = [row[s] if row[s] is not None else 0.0 for s in sides]
        bars = ax.bar(sides, values, color=[COLORS[s] for s in sides])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        if min(values) >= 0:  # room for the labels; an all-zero metric still gets a visible 0..1 axis
            ax.set_ylim(0, max(values) * 1.2 or 1.0)
        hint = {1: " (↑ better)", -1: " (↓ better)", 0: ""}[direction(row["metric"])]
        ax.set_title(row["metric"] + hint, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig, path)


def read_metrics_log(path: Path | None) -> list[dict]:
    """Rows of metrics.jsonl that carry a loss (an unreadable line, e.g. a crash's torn last line, is skipped)."""
    if path is None or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("loss") is not None and row.get("step") is not None:
            rows.append(row)
    return rows


def _loss_curves(log: list[dict], path: Path) -> str | None:
    """Train loss as a line, eval loss as markers on the same step axis."""
    from matplotlib.figure import Figure

    if not log:
        return None
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = sorted((r["step"], r["loss"]) for r in log if r.get("split", "train") == split)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=split, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig, path)


def _length_hist(examples: list[dict], sides: list[str], path: Path) -> str | None:
    """Answer lengths in words for each model and for the references, on shared bins."""
    from matplotlib.figure import Figure

    series = {s: [len(str(e[s].get("answer", "")).split()) for e in examples if s in e] for s in sides}
    series["reference"] = [len(str(e.get("reference", "")).split()) for e in examples]
    if not series["reference"]:
        return None
    top = max(max(v) for v in series.values() if v) + 1
    bins = list(range(0, top + max(1, top // 30), max(1, top // 30)))
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for name, values in series.items():
        ax.hist(values, bins=bins, alpha=0.5, label=name, color=COLORS[name])
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("examples")
    ax.legend()
    return _png(fig, path)


def _bucket_bars(counts: dict[str, dict[str, int]], path: Path) -> str | None:
    """Grouped bars: examples per error bucket, one bar per model."""
    from matplotlib.figure import Figure

    if not counts:
        return None
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    width = 0.8 / len(counts)
    for i, (side, c) in enumerate(counts.items()):
        xs = [j + i * width for j in range(len(BUCKETS))]
        ax.bar(xs, [c.get(b, 0) for b in BUCKETS], width=width, label=side, color=COLORS[side])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BUCKETS))], list(BUCKETS), rotation=20, fontsize=8)
    ax.set_ylabel("examples")
    ax.legend()
    return _png(fig, path)


# ---------------------------------------------------------------- HTML


def _score_key(examples: list[dict], sides: list[str]) -> str | None:
    """The first of EXAMPLE_SCORES that every model's per-example metrics carry."""
    for key in EXAMPLE_SCORES:
        if examples and all(
            e.get(s, {}).get("metrics", {}).get(key) is not None for e in examples for s in sides
        ):
            return key
    return None


def pick_examples(examples: list[dict], sides: list[str]) -> list[tuple[str, list[dict]]]:
    """(heading, examples): largest improvements and regressions by score delta; one model: its worst."""
    key = _score_key(examples, sides)
    if key is None:
        return []
    if len(sides) == 1:
        worst = sorted(examples, key=lambda e: e[sides[0]]["metrics"][key])[:N_EXAMPLES]
        return [(f"Lowest {key}", worst)]

    def delta(e: dict) -> float:
        return e["tuned"]["metrics"][key] - e["base"]["metrics"][key]

    ranked = sorted(examples, key=delta)
    ups = [e for e in reversed(ranked) if delta(e) > 0][:N_EXAMPLES]
    downs = [e for e in ranked if delta(e) < 0][:N_EXAMPLES]
    return [(f"Largest improvements ({key}, tuned − base)", ups), (f"Largest regressions ({key})", downs)]


def _example_table(examples: list[dict], sides: list[str], key: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(s)}</th>" for s in sides)
    out = [f'<table class="ex"><tr><th>question</th><th>reference</th>{head}</tr>']
    for e in examples:
        cells = []
        for s in sides:
            side = e.get(s, {})
            score = side.get("metrics", {}).get(key)
            tags = ", ".join(side.get("buckets") or [])
            meta = f"{key} {_fmt(score)}" + (f" · {tags}" if tags else "")
            cells.append(
                f'<td>{esc(str(side.get("answer", "")))}<br><span class="note">{esc(meta)}</span></td>'
            )
        question = e.get("question") or e.get("prompt", "")
        out.append(
            f"<tr><td>{esc(str(question))}</td><td>{esc(str(e.get('reference', '')))}</td>{''.join(cells)}</tr>"
        )
    return "\n".join(out) + "</table>"


def _summary_html(metrics: dict, sides: list[str]) -> str:
    two = len(sides) == 2
    head = "".join(f"<th>{s}</th>" for s in sides) + ("<th>delta</th>" if two else "")
    out = [f"<table><tr><th>metric</th>{head}</tr>"]
    for row in summary_rows(metrics):
        cells = "".join(f'<td class="num">{_fmt(row.get(s))}</td>' for s in sides)
        if two:
            text = f"{_fmt(row['delta'], signed=True)} {_arrow(row)}".strip()
            cells += f'<td class="num {row["verdict"]}">{html.escape(text)}</td>'
        out.append(f"<tr><td>{html.escape(row['metric'])}</td>{cells}</tr>")
    return "\n".join(out) + "</table>"


def write_report(
    out_dir: Path, metrics: dict, rows: list[dict], metrics_log: Path | None, title: str
) -> Path:
    """Write report.html (self-contained) and its PNGs into out_dir; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sides = sides_of(metrics) or [s for s in SIDES if rows and s in rows[0]]
    counts = (
        {s: bucket_counts(r[s].get("buckets") or [] for r in rows if s in r) for s in sides} if rows else {}
    )
    plots = [
        ("Metrics", _metric_bars(summary_rows(metrics), sides, out_dir / "metrics.png")),
        ("Training and eval loss", _loss_curves(read_metrics_log(metrics_log), out_dir / "loss.png")),
        ("Answer lengths", _length_hist(rows, sides, out_dir / "lengths.png") if rows else None),
        ("Error buckets", _bucket_bars(counts, out_dir / "buckets.png")),
    ]
    esc = html.escape
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
        "<h2>Summary</h2>",
        _summary_html(metrics, sides),
    ]
    notes = metrics.get("notes") or []
    if notes:
        parts.append("<ul>" + "".join(f'<li class="note">{esc(str(n))}</li>' for n in notes) + "</ul>")
    for heading, uri in plots:
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(f'<img alt="{esc(heading)}" src="{uri}">' if uri else '<p class="note">no data</p>')
    if counts:
        parts.append(
            _summary_html({s: {f"buckets.{b}": n for b, n in c.items()} for s, c in counts.items()}, sides)
        )
    key = _score_key(rows, sides)
    for heading, chosen in pick_examples(rows, sides):
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(_example_table(chosen, sides, key) if chosen else '<p class="note">none</p>')
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
