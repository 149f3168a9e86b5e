"""The systems x metrics view: readable metric names and their direction, the rows both the terminal table and
the HTML report show, and the terminal table itself (Rich).

metrics.json holds one entry per system under its name (`{"base": {...}, "tuned": {...}, "tuned+rag": ...}`),
plus `systems` (their order), `delta` (tuned - base), `pairwise`, `verdict`, `notes`, `models` and, under
eval.time_budget, `answered` (how many questions every system was asked in the budget).
"""

from __future__ import annotations

from typing import Any

# Every metric a system gets, by family (one grouped chart each), in the order the compact table lists them.
FAMILIES: dict[str, tuple[str, ...]] = {
    "held-out answers (0-1)": (
        "judge_score",
        "token_f1",
        "rouge_l",
        "exact_match",
        "embedding_sim",
        "numeric_match",
    ),
    "trained (probe) questions (0-1)": (
        "probe_numeric_recall",
        "probe_token_f1",
        "probe_rouge_l",
        "probe_exact_match",
        "retrieval_recall",
    ),
    "BLEU (0-100)": ("corpus_bleu", "bleu"),
    "loss": ("loss", "perplexity"),
    "prompt and answer tokens": ("prompt_tokens", "completion_tokens", "answer_words"),
    "seconds": ("latency_p50_s", "latency_p95_s", "train_seconds"),
}
LABELS = {
    "judge_score": "judge score",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "exact_match": "exact match",
    "embedding_sim": "embedding similarity",
    "numeric_match": "numeric match",
    "probe_numeric_recall": "probe: numbers recalled",
    "probe_token_f1": "probe: token F1",
    "probe_rouge_l": "probe: ROUGE-L",
    "probe_exact_match": "probe: exact match",
    "retrieval_recall": "retrieval recall@k (probe)",
    "corpus_bleu": "BLEU (corpus)",
    "bleu": "BLEU (mean sentence)",
    "loss": "answer loss",
    "perplexity": "perplexity",
    "prompt_tokens": "prompt tokens / answer",
    "completion_tokens": "answer tokens / answer",
    "answer_words": "answer words",
    "latency_p50_s": "latency p50 (s)",
    "latency_p95_s": "latency p95 (s)",
    "seconds_per_answer": "seconds / answer (throughput)",
    "train_seconds": "training time (s)",
    "train_peak_memory_gb": "training peak memory (GB)",
    "peak_memory_gb": "peak memory answering (GB)",
    "retrieval_ms": "retrieval ms / question",
    "question_overlap": "words copied from question",
    "judge_failed": "answers the judge could not score",
    "n": "questions",
    "probe_n": "probe questions",
}
# Lower is better: losses and every cost; bucket counts (flattened as "buckets.<name>") are too.
LOWER_IS_BETTER = {
    "loss",
    "perplexity",
    "question_overlap",
    "judge_failed",
    "prompt_tokens",
    "latency_p50_s",
    "latency_p95_s",
    "seconds_per_answer",
    "train_seconds",
    "train_peak_memory_gb",
    "peak_memory_gb",
    "retrieval_ms",
}
# Describe answers without being better or worse when they move.
NEUTRAL = {"n", "probe_n", "answer_words", "completion_tokens"}
# Top-level keys of metrics.json that are not systems.
NOT_SYSTEMS = {"delta", "notes", "models", "systems", "pairwise", "verdict", "answered"}
LEGACY_SIDES = ("base", "tuned")


def direction(name: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when the metric is descriptive.

    The one rule for every metric name: compare's table, train.select (best/) and sweep.metric (`auto`) all
    read it; a name unknown here but holding loss/ppl/perplexity (eval_loss, train_loss) is a loss.
    """
    if name in NEUTRAL:
        return 0
    if name in LOWER_IS_BETTER or name.startswith(("buckets.", "bucket_")):
        return -1
    if any(word in name.lower() for word in ("loss", "ppl", "perplexity")):
        return -1
    return 1


def minimized(name: str, mode: str = "auto") -> bool:
    """True when `name` is minimised: mode 'min'/'max' when given, else the metric's own direction."""
    return mode == "min" if mode in ("min", "max") else direction(name) < 0


def label(name: str, arrow: bool = True) -> str:
    """'token_f1' -> 'token F1 ↑' (↓ when lower is better, no arrow when descriptive)."""
    text = LABELS.get(name) or (f"errors: {name[8:]}" if name.startswith("buckets.") else name)
    hint = {1: " ↑", -1: " ↓", 0: ""}[direction(name)] if arrow else ""
    return text + hint


def sides_of(metrics: dict) -> list[str]:
    """The systems in metrics.json, in their configured order (older files: base, tuned)."""
    listed = metrics.get("systems")
    if listed:
        return [s for s in listed if isinstance(metrics.get(s), dict)]
    return [s for s in LEGACY_SIDES if metrics.get(s)]


def flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'buckets': {'empty': 2}} -> {'buckets.empty': 2}; non-numeric leaves dropped."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            out[prefix + k] = v
    return out


def headline(name: str) -> bool:
    """Whether the compact table shows this metric (the rest is per-metric detail)."""
    return any(name in names for names in FAMILIES.values())


def best_of(values: dict[str, Any], name: str) -> set[str]:
    """The systems with the best value of this metric (none for descriptive metrics or a single system)."""
    known = {s: v for s, v in values.items() if v is not None}
    d = direction(name)
    if d == 0 or len(known) < 2 or len(set(known.values())) == 1:
        return set()
    top = max(known.values()) if d > 0 else min(known.values())
    return {s for s, v in known.items() if v == top}


def summary_rows(metrics: dict, compact: bool = False) -> list[dict]:
    """One row per metric: name, label, each system's value, the best systems; with two, delta and verdict."""
    sides = sides_of(metrics)
    flats = {s: flat(metrics[s]) for s in sides}
    deltas = flat(metrics.get("delta") or {})
    names = list(dict.fromkeys(k for s in sides for k in flats[s]))
    if compact:
        order = [n for names_ in FAMILIES.values() for n in names_]
        names = [n for n in order if n in names]
    rows = []
    for name in names:
        values = {s: flats[s].get(name) for s in sides}
        row: dict[str, Any] = {"metric": name, "label": label(name), **values, "best": best_of(values, name)}
        if len(sides) == 2:
            a, b = (values[s] for s in sides)
            delta = deltas.get(name) if sides == list(LEGACY_SIDES) else None
            if delta is None and a is not None and b is not None:
                delta = b - a
            row["delta"] = delta
            sign = 0 if not delta else (1 if delta > 0 else -1)
            row["verdict"] = {1: "better", -1: "worse", 0: ""}[sign * direction(name)] if sign else ""
        rows.append(row)
    return rows


def fmt(v: Any, signed: bool = False) -> str:
    """A number for a table cell: 4 significant digits, '—' when missing."""
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:+d}" if signed else str(v)
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def delta_text(row: dict) -> str:
    """'+0.3 ▲ better' for a two-system row."""
    delta = row.get("delta")
    arrow = ("▲" if delta > 0 else "▼") + (f" {row['verdict']}" if row["verdict"] else "") if delta else ""
    return f"{fmt(delta, signed=True)} {arrow}".strip()


def answered_text(metrics: dict) -> str | None:
    """eval.time_budget's line: 'answered N of M held-out and P of Q probe questions in the budget (…s)'."""
    answered = metrics.get("answered")
    return answered.get("text") if isinstance(answered, dict) else None


def print_summary(metrics: dict, console: Any) -> None:
    """The verdict, eval.time_budget's answered line, then the compact systems x metrics table."""
    from rich.table import Table

    sides = sides_of(metrics)
    two = len(sides) == 2
    if metrics.get("verdict"):
        console.print(metrics["verdict"])
    if answered_text(metrics):
        console.print(answered_text(metrics))
    title = "evaluation: " + (" vs ".join(sides) if sides else "nothing compared")
    table = Table(title=title)
    table.add_column("metric (↑/↓: higher/lower is better)")
    for s in sides:
        table.add_column(s, justify="right")
    if two:
        table.add_column(f"{sides[1]} - {sides[0]}", justify="right")
    rows = summary_rows(metrics, compact=True) or summary_rows(metrics)
    for row in rows:
        cells = [row["label"]]
        for s in sides:
            text = fmt(row[s])
            cells.append(f"[bold green]{text}[/bold green]" if s in row["best"] and not two else text)
        if two:
            style = {"better": "green", "worse": "red"}.get(row["verdict"], "")
            cells.append(f"[{style}]{delta_text(row)}[/{style}]" if style else delta_text(row))
        table.add_row(*cells)
    console.print(table)
    for note in metrics.get("notes") or []:
        console.print(f"note: {note}")
