"""`tunesmith runs compare A B ...`: two or more runs on one self-contained HTML page.

Sections: the runs (status, steps, throughput, eval loss), overlaid train and eval loss curves (one PNG,
inlined as a data URI), the config keys that differ, the eval metrics side by side (each run's
eval/metrics.json, every model it evaluated) and the test questions whose answers differ between runs
(eval/predictions.jsonl joined on the question). Every piece of user text goes through html.escape.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import UserError
from tunesmith.eval.summary import best_of, sides_of
from tunesmith.runs.scan import Corrupt, load_config_dict, load_json, read_metrics, read_run

MAX_ANSWERS = 300  # differing questions shown; the rest are counted in a note
HASHES = ("data_hash", "template_hash", "tokenizer_hash")
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;color:#222;padding:0 1em}h1{font-size:1.5em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;width:100%}th,td{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left;white-space:pre-wrap}img{max-width:100%}.note{color:#666}
.best{font-weight:700;color:#1a7f37}.missing{color:#999}"""


@dataclass
class RunView:
    """What the page shows of one run, read from its dir."""

    label: str
    row: dict  # scan.read_run's row
    config: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, plus the manifest's hashes
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl rows
    evals: dict[str, Any] = field(default_factory=dict)  # "<model>.<metric>" -> value
    answers: dict[str, dict] = field(default_factory=dict)  # question -> prediction row
    notes: list[str] = field(default_factory=list)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _predictions(path: Path, notes: list[str]) -> dict[str, dict]:
    """question -> row of eval/predictions.jsonl (a repeated question gets ' #2', ' #3' so none is lost)."""
    if not path.is_file():
        return {}
    out: dict[str, dict] = {}
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = None
        if not isinstance(row, dict):
            bad += bool(line.strip())
            continue
        key = str(row.get("question") or row.get("prompt") or "")
        n, base = 1, key
        while key in out:
            n += 1
            key = f"{base} #{n}"
        out[key] = row
    if bad:
        notes.append(f"{path}: {bad} unreadable line(s) left out")
    return out


def load_view(run: Path, label: str) -> RunView:
    """Read one run dir; a corrupt file becomes a note on the page, never a crash."""
    if not run.is_dir():
        raise UserError(f"runs compare: {run} is not a directory (give run dirs, e.g. runs/a runs/b)")
    view = RunView(label=label, row=read_run(run, run.parent))
    for read in (_read_config, _read_evals):
        try:
            read(run, view)
        except Corrupt as e:
            view.notes.append(f"{run}: {e}")
    view.metrics, bad = read_metrics(run / "metrics.jsonl")
    if bad:
        view.notes.append(f"{run}/metrics.jsonl: {bad} unreadable line(s) left out")
    view.answers = _predictions(run / "eval" / "predictions.jsonl", view.notes)
    return view


def _read_config(run: Path, view: RunView) -> None:
    view.config = flatten(load_config_dict(run) or {})
    manifest = load_json(run / "manifest.json")
    if isinstance(manifest, dict):
        view.config.update({f"manifest.{h}": manifest.get(h) for h in HASHES if h in manifest})


def _read_evals(run: Path, view: RunView) -> None:
    evals = load_json(run / "eval" / "metrics.json")
    if isinstance(evals, dict):
        for system in sides_of(evals):  # base, tuned and any other system eval.systems asked
            view.evals.update(flatten(evals[system], f"{system}."))


def labels_of(runs: list[Path]) -> list[str]:
    """Each run's path relative to their common parent: short, and distinct for distinct dirs."""
    resolved = [r.resolve() for r in runs]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    return [r.relative_to(common).as_posix() for r in resolved]


# ---------------------------------------------------------------- the sections


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else json.dumps(v)


def _table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    """An HTML table; cells are already escaped HTML."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def runs_section(views: list[RunView]) -> str:
    """One row per run: status (and why), model, steps, tokens/s, best and final eval loss."""
    head = ["run", "status", "model", "steps", "tokens/s", "best eval loss", "final eval loss", "reason"]
    rows = []
    for v in views:
        r = v.row
        best = (
            None if r["best_eval_loss"] is None else f"{r['best_eval_loss']:.4f} @ step {r['best_eval_step']}"
        )
        cells = [v.label, r["status"], r["model"], r["steps"], r["tokens_per_s"], best, r["final_eval_loss"]]
        cells.append(r["reason"])
        rows.append([html.escape(_fmt(c)) for c in cells])
    return "<h2>Runs</h2>" + _table([html.escape(h) for h in head], rows, "runs")


def loss_plot(views: list[RunView]) -> str | None:
    """Train (left) and eval (right) loss by step, a colour per run; a PNG data URI (None: nothing logged)."""
    from matplotlib.figure import Figure  # the Figure API: no pyplot global state

    curves = []
    for v in views:
        train = [(m["step"], m["loss"]) for m in v.metrics if m.get("split") == "train" and "loss" in m]
        evals = [(m["step"], m["loss"]) for m in v.metrics if m.get("split") == "eval" and "loss" in m]
        curves.append((v.label, train, evals))
    if not any(t or e for _, t, e in curves):
        return None
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    for i, (label, train, evals) in enumerate(curves):
        color = f"C{i % 10}"
        if train:
            axes[0].plot(*zip(*train), color=color, label=label)
        if evals:
            axes[1].plot(*zip(*evals), color=color, marker="o", label=label)
    for ax, title in zip(axes, ("train loss", "eval loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (per label token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def config_diff(views: list[RunView]) -> list[tuple[str, list[Any]]]:
    """(key, value per run) for every config key (and data/template/tokenizer hash) whose values differ."""
    missing = object()
    keys = list(dict.fromkeys(k for v in views for k in v.config))
    out = []
    for key in keys:
        values = [v.config.get(key, missing) for v in views]
        if any(json.dumps(x, default=str) != json.dumps(values[0], default=str) for x in values[1:]):
            out.append((key, [None if x is missing else x for x in values]))
    return out


def diff_section(views: list[RunView]) -> str:
    diff = config_diff(views)
    head = ["key", *(html.escape(v.label) for v in views)]
    rows = [[html.escape(k), *(html.escape(_fmt(x)) for x in vals)] for k, vals in diff]
    if not rows:
        return '<h2>Config diff</h2><p class="note" id="config-diff">the configs are identical</p>'
    return "<h2>Config diff</h2><p class=note>only the keys that differ</p>" + _table(
        head, rows, "config-diff"
    )


def metrics_section(views: list[RunView]) -> str:
    """Every run's eval/metrics.json side by side, a row's best value in bold (when better is defined)."""
    names = list(dict.fromkeys(k for v in views for k in v.evals))
    if not names:
        return "<h2>Eval metrics</h2><p class=note>no run has eval/metrics.json (run `tunesmith compare`)</p>"
    rows = []
    for name in names:
        values = {v.label: v.evals.get(name) for v in views}
        numbers = {k: x for k, x in values.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
        best = best_of(numbers, name.split(".", 1)[-1])  # the metric's name without its system
        cells = [
            f'<span class="best">{html.escape(_fmt(x))}</span>' if k in best else html.escape(_fmt(x))
            for k, x in values.items()
        ]
        rows.append([html.escape(name), *cells])
    head = ["metric", *(html.escape(v.label) for v in views)]
    return "<h2>Eval metrics</h2>" + _table(head, rows, "metrics")


def _answer_of(row: dict | None) -> str | None:
    """The tuned model's answer in a prediction row (else the first system's that has one)."""
    if row is None:
        return None
    sides = [row.get("tuned"), *row.values()]
    return next(
        (s["answer"] for s in sides if isinstance(s, dict) and isinstance(s.get("answer"), str)), None
    )


def answers_section(views: list[RunView]) -> str:
    """Test questions whose (tuned) answers differ between the runs that have eval/predictions.jsonl, with the
    reference; a question one of them was not asked counts as differing."""
    asked = [v for v in views if v.answers]
    if len(asked) < 2:
        return (
            "<h2>Answers that differ</h2><p class=note>fewer than two runs have eval/predictions.jsonl "
            "(run `tunesmith compare` on each)</p>"
        )
    left_out = [v.label for v in views if not v.answers]
    views = asked
    questions = list(dict.fromkeys(q for v in views for q in v.answers))
    differ = []
    for q in questions:
        answers = [_answer_of(v.answers.get(q)) for v in views]
        if len({(a or "").strip() if a is not None else None for a in answers}) > 1:
            ref = next((v.answers[q].get("reference") for v in views if q in v.answers), None)
            differ.append((q, ref, answers))
    note = f"{len(differ)} of {len(questions)} questions answered differently"
    if len(differ) > MAX_ANSWERS:
        note += f"; the first {MAX_ANSWERS} are shown, {len(differ) - MAX_ANSWERS} more are left out"
    if left_out:
        note += f"; not evaluated: {', '.join(left_out)}"
    rows = [
        [
            html.escape(q),
            html.escape(_fmt(ref)),
            *(
                html.escape(a) if a is not None else '<span class="missing">(not asked)</span>'
                for a in answers
            ),
        ]
        for q, ref, answers in differ[:MAX_ANSWERS]
    ]
    head = ["question", "reference", *(html.escape(v.label) for v in views)]
    body = _table(head, rows, "answers") if rows else ""
    return f"<h2>Answers that differ</h2><p class=note>{html.escape(note)}</p>{body}"


def render_page(views: list[RunView]) -> str:
    """The whole page as one HTML string (no external resources)."""
    title = "tunesmith runs compare: " + " vs ".join(v.label for v in views)
    plot = loss_plot(views)
    loss = (
        f'<img id="loss-plot" alt="train and eval loss per run" src="{plot}">'
        if plot
        else "<p class=note>no run has metrics.jsonl</p>"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for v in views for n in v.notes)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        runs_section(views),
        f"<h2>Loss</h2>{loss}",
        diff_section(views),
        metrics_section(views),
        answers_section(views),
        f"<h2>Notes</h2><ul id=notes>{notes}</ul>" if notes else "",
        "</body></html>",
    ]
    return "\n".join(parts)


def compare_runs(runs: list[Path], out: Path) -> Path:
    """Write the comparison page of `runs` (two or more run dirs) to `out`; returns `out`."""
    if len(runs) < 2:
        raise UserError("runs compare: give two or more run dirs (e.g. tunesmith runs compare runs/a runs/b)")
    views = [load_view(Path(run), label) for run, label in zip(runs, labels_of([Path(r) for r in runs]))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(views), encoding="utf-8")
    return out
