"""The evaluation report: one self-contained report.html (PNG plots inlined as data URIs) plus the PNG files.

It leads with the verdict (eval/verdict.py) and one compact systems x metrics table with readable names and
their direction (eval/summary.py), then grouped charts (one per metric family, a bar per system), per-question
wins between systems with the examples that differ most, and the per-metric detail. Inputs are what
compare/eval write: metrics.json (one entry per system under its name) and prediction rows
`{"prompt", "question", "reference", "<system>": {"answer", "metrics", "buckets"}, ...}`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from tunesmith.eval.buckets import BUCKETS, bucket_counts
from tunesmith.eval.summary import FAMILIES, answered_text, delta_text, fmt, label, sides_of, summary_rows
from tunesmith.eval.verdict import differing, score_key

N_EXAMPLES = 10  # examples per heading for base vs tuned
N_PAIR_EXAMPLES = 3  # per heading for every other system against the reference
PALETTE = ("#8c8c8c", "#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#17becf", "#8c564b", "#e377c2")
REFERENCE_COLOR = "#2ca02c"

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;width:100%}th,td{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}.best{color:#1a7f37;font-weight:700}
.ex td{white-space:pre-wrap;font-size:.9em;max-width:320px}img{max-width:100%;margin:.5em 0}.note{color:#666}
.verdict{font-size:1.1em;background:#f6f8fa;border-left:4px solid #1f77b4;padding:.6em 1em}"""


def colors(sides: list[str]) -> dict[str, str]:
    """A fixed colour per system, in configured order (base grey, the next blue, ...), plus the reference."""
    return {**{s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sides)}, "reference": REFERENCE_COLOR}


# ---------------------------------------------------------------- plots (matplotlib's Figure API renders
# PNGs through Agg without touching pyplot's global backend state, so it is safe in servers and tests)


def _png(fig: Any, path: Path) -> str:
    """Save the figure to `path` and return it as a data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    path.write_bytes(buf.getvalue())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _family_bars(metrics: dict, sides: list[str], path: Path) -> str | None:
    """A panel per metric family (scales differ: BLEU 0-100, F1 0-1, loss), grouped bars: one per system."""
    from matplotlib.figure import Figure

    rows = {r["metric"]: r for r in summary_rows(metrics)}
    panels = []
    for family, names in FAMILIES.items():
        present = [n for n in names if n in rows and any(rows[n][s] is not None for s in sides)]
        if present:
            panels.append((family, present))
    if not panels:
        return None
    cols = min(2, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.0 * cols, 3.2 * nrows))
    palette = colors(sides)
    width = 0.8 / len(sides)
    for i, (family, names) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for j, s in enumerate(sides):
            xs = [k + j * width for k in range(len(names))]
            values = [rows[n][s] if rows[n][s] is not None else math.nan for n in names]  # nan: no bar
            ax.bar(xs, values, width=width, label=s, color=palette[s])
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], [label(n) for n in names], fontsize=7)
        ax.tick_params(axis="x", rotation=15)
        ax.set_title(family, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig, path)


def read_metrics_log(path: Path | None) -> list[dict]:
    """Rows of metrics.jsonl that carry a loss (an unreadable line, e.g. a crash's torn last one, skipped)."""
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
    """Answer lengths in words for each system and for the references, on shared bins."""
    from matplotlib.figure import Figure

    series = {s: [len(str(e[s].get("answer", "")).split()) for e in examples if s in e] for s in sides}
    series["reference"] = [len(str(e.get("reference", "")).split()) for e in examples]
    if not series["reference"]:
        return None
    top = max(max(v) for v in series.values() if v) + 1
    bins = list(range(0, top + max(1, top // 30), max(1, top // 30)))
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    palette = colors(sides)
    for name, values in series.items():
        ax.hist(values, bins=bins, alpha=0.45, label=name, color=palette[name])
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("examples")
    ax.legend()
    return _png(fig, path)


def _bucket_bars(counts: dict[str, dict[str, int]], path: Path) -> str | None:
    """Grouped bars: examples per error bucket, one bar per system."""
    from matplotlib.figure import Figure

    if not counts:
        return None
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    width = 0.8 / len(counts)
    palette = colors(list(counts))
    for i, (side, c) in enumerate(counts.items()):
        xs = [j + i * width for j in range(len(BUCKETS))]
        ax.bar(xs, [c.get(b, 0) for b in BUCKETS], width=width, label=side, color=palette[side])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BUCKETS))], list(BUCKETS), rotation=20, fontsize=8)
    ax.set_ylabel("examples")
    ax.legend()
    return _png(fig, path)


# ---------------------------------------------------------------- HTML


def example_sections(rows: list[dict], sides: list[str]) -> list[tuple[str, list[str], list[dict]]]:
    """(heading, the two systems shown, examples): what differs most between systems, per-question.

    base vs tuned: the largest improvements and regressions; every other system against the reference
    (tuned when compared, else the first system); a single system: its worst answers.
    """
    key = score_key(rows, sides)
    if key is None:
        return []
    if len(sides) == 1:
        worst = sorted(rows, key=lambda e: e[sides[0]]["metrics"][key])[:N_EXAMPLES]
        return [(f"Lowest {key}", sides, worst)]
    out = []
    if "base" in sides and "tuned" in sides:
        ups, downs = differing(rows, "base", "tuned", key, N_EXAMPLES)
        pair = ["base", "tuned"]
        out += [(f"Largest improvements ({key}, tuned − base)", pair, ups)]
        out += [(f"Largest regressions ({key}, tuned − base)", pair, downs)]
    ref = "tuned" if "tuned" in sides else sides[0]
    for s in sides:
        if s == ref or {s, ref} == {"base", "tuned"}:
            continue
        ups, downs = differing(rows, ref, s, key, N_PAIR_EXAMPLES)
        out += [(f"Where {s} beats {ref} most ({key})", [ref, s], ups)]
        out += [(f"Where {ref} beats {s} most ({key})", [ref, s], downs)]
    return out


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
            meta = f"{key} {fmt(score)}" + (f" · {tags}" if tags else "")
            cells.append(
                f'<td>{esc(str(side.get("answer", "")))}<br><span class="note">{esc(meta)}</span></td>'
            )
        question = e.get("question") or e.get("prompt", "")
        out.append(
            f"<tr><td>{esc(str(question))}</td><td>{esc(str(e.get('reference', '')))}</td>"
            + "".join(cells)
            + "</tr>"
        )
    return "\n".join(out) + "</table>"


def _summary_html(metrics: dict, sides: list[str], compact: bool) -> str:
    two = len(sides) == 2
    esc = html.escape
    head = "".join(f"<th>{esc(s)}</th>" for s in sides) + (
        f"<th>{esc(sides[1])} − {esc(sides[0])}</th>" if two else ""
    )
    out = [f"<table><tr><th>metric (↑/↓: higher/lower is better)</th>{head}</tr>"]
    for row in summary_rows(metrics, compact=compact):
        cells = "".join(
            f'<td class="num{" best" if s in row["best"] and not two else ""}">{fmt(row.get(s))}</td>'
            for s in sides
        )
        if two:
            cells += f'<td class="num {row["verdict"]}">{esc(delta_text(row))}</td>'
        out.append(f"<tr><td>{esc(row['label'])}</td>{cells}</tr>")
    return "\n".join(out) + "</table>"


def _pairwise_html(pairwise: dict) -> str:
    """Per-question wins/losses/ties of each later system against each earlier one."""
    pairs = pairwise.get("pairs") or {}
    if not pairs:
        return ""
    probe = any("probe_wins" in p for p in pairs.values())
    head = "<th>held-out: wins / losses / ties</th>" + (
        "<th>probe: wins / losses / ties</th>" if probe else ""
    )
    out = [f"<table><tr><th>systems</th>{head}</tr>"]
    for name, p in pairs.items():
        cells = f'<td class="num">{p["wins"]} / {p["losses"]} / {p["ties"]}</td>'
        if probe:
            probe_cell = " / ".join(str(p.get(k, "—")) for k in ("probe_wins", "probe_losses", "probe_ties"))
            cells += f'<td class="num">{probe_cell}</td>'
        out.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    metric = html.escape(label(pairwise.get("metric", ""), arrow=False))
    return "\n".join(out) + f'</table><p class="note">a win: a higher per-question {metric}</p>'


def write_report(
    out_dir: Path,
    metrics: dict,
    rows: list[dict],
    metrics_log: Path | None,
    title: str,
    probe_rows: list[dict] | None = None,
) -> Path:
    """Write report.html (self-contained) and its PNGs into out_dir; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sides = sides_of(metrics) or [s for s in ("base", "tuned") if rows and s in rows[0]]
    counts = (
        {s: bucket_counts(r[s].get("buckets") or [] for r in rows if s in r) for s in sides} if rows else {}
    )
    esc = html.escape
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
    ]
    if metrics.get("verdict"):
        parts.append(f'<p class="verdict">{esc(metrics["verdict"])}</p>')
    if answered_text(metrics):
        parts.append(f'<p class="verdict">{esc(answered_text(metrics))}</p>')
    parts += ["<h2>Summary</h2>", _summary_html(metrics, sides, compact=True)]
    models = metrics.get("models") or {}
    if models:
        parts.append(
            "<ul>"
            + "".join(f'<li class="note">{esc(s)}: {esc(str(m))}</li>' for s, m in models.items())
            + "</ul>"
        )
    plots = [
        ("Metrics by family", _family_bars(metrics, sides, out_dir / "metrics.png")),
        ("Training and eval loss", _loss_curves(read_metrics_log(metrics_log), out_dir / "loss.png")),
        ("Answer lengths", _length_hist(rows, sides, out_dir / "lengths.png") if rows else None),
        ("Error buckets", _bucket_bars(counts, out_dir / "buckets.png")),
    ]
    for heading, uri in plots:
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(f'<img alt="{esc(heading)}" src="{uri}">' if uri else '<p class="note">no data</p>')
    if metrics.get("pairwise"):
        parts += ["<h2>Per-question wins</h2>", _pairwise_html(metrics["pairwise"])]
    key = score_key(rows, sides)
    for heading, shown, chosen in example_sections(rows, sides):
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(_example_table(chosen, shown, key) if chosen else '<p class="note">none</p>')
    parts += ["<h2>Every metric</h2>", _summary_html(metrics, sides, compact=False)]
    notes = metrics.get("notes") or []
    if notes:
        parts.append("<ul>" + "".join(f'<li class="note">{esc(str(n))}</li>' for n in notes) + "</ul>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
