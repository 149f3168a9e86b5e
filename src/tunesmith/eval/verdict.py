"""What the numbers say: per-question wins between systems, and a plain-language verdict computed from them.

The verdict names what wins on held-out quality, what recalls the trained (probe) facts, what is cheapest, and
whether retrieval and fine-tuning combine (tuned+rag better than both tuned and base+rag). Every sentence is a
comparison of numbers in metrics.json, so the paragraph changes when the numbers do.
"""

from __future__ import annotations

from tunesmith.eval.summary import LABELS, sides_of

# Per-example score for wins/losses and "examples that differ most", the first one every system has.
EXAMPLE_SCORES = ("rouge_l", "token_f1", "exact_match")
# A difference smaller than this is a tie (scores are in [0, 1]).
TIE = 1e-9
# Headline quality on held-out questions, the first one every system has.
QUALITY = ("judge_score", "token_f1", "rouge_l")
# What the probe is judged on, the first one every system has.
RECALL = ("probe_numeric_recall", "probe_token_f1")


def score_key(rows: list[dict], systems: list[str]) -> str | None:
    """The first of EXAMPLE_SCORES that every system's per-example metrics carry."""
    for key in EXAMPLE_SCORES:
        if rows and all(r.get(s, {}).get("metrics", {}).get(key) is not None for r in rows for s in systems):
            return key
    return None


def _tally(rows: list[dict], a: str, b: str, key: str) -> tuple[int, int, int]:
    """(questions a wins, loses, ties) against b on the per-example score."""
    diffs = [r[a]["metrics"][key] - r[b]["metrics"][key] for r in rows]
    return sum(d > TIE for d in diffs), sum(d < -TIE for d in diffs), sum(abs(d) <= TIE for d in diffs)


def pairwise(rows: list[dict], probe_rows: list[dict], systems: list[str]) -> dict:
    """{"metric", "pairs": {"B vs A": {wins, losses, ties, probe_wins, ...}}} for every later B, earlier A."""
    key = score_key(rows, systems)
    if key is None or len(systems) < 2:
        return {}
    probe_key = score_key(probe_rows, systems)
    pairs = {}
    for j, b in enumerate(systems):
        for a in systems[:j]:
            w, lost, t = _tally(rows, b, a, key)
            entry = {"wins": w, "losses": lost, "ties": t}
            if probe_key is not None:
                pw, pl, pt = _tally(probe_rows, b, a, probe_key)
                entry.update(probe_wins=pw, probe_losses=pl, probe_ties=pt)
            pairs[f"{b} vs {a}"] = entry
    return {"metric": key, "pairs": pairs}


def differing(rows: list[dict], a: str, b: str, key: str, n: int) -> tuple[list[dict], list[dict]]:
    """(rows where b beats a most, rows where a beats b most), at most n each, largest difference first."""
    scored = [(r[b]["metrics"][key] - r[a]["metrics"][key], i) for i, r in enumerate(rows)]
    ups = [rows[i] for d, i in sorted(scored, key=lambda x: (-x[0], x[1])) if d > TIE][:n]
    downs = [rows[i] for d, i in sorted(scored) if d < -TIE][:n]
    return ups, downs


def _first_shared(metrics: dict, systems: list[str], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if all(metrics[s].get(k) is not None for s in systems)), None)


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _quality_sentence(metrics: dict, systems: list[str]) -> str | None:
    key = _first_shared(metrics, systems, QUALITY)
    if key is None:
        return None
    ranked = sorted(systems, key=lambda s: -metrics[s][key])
    top = ranked[0]
    rest = ", ".join(f"{s} {metrics[s][key]:.3g}" for s in ranked[1:4])
    return f"On held-out questions {top} answers best ({LABELS[key]} {metrics[top][key]:.3g}" + (
        f"; then {rest})." if rest else ")."
    )


def _probe_sentence(metrics: dict, systems: list[str]) -> str | None:
    key = _first_shared(metrics, systems, RECALL)
    if key is None:
        return None
    ranked = sorted(systems, key=lambda s: -metrics[s][key])
    top, low = ranked[0], ranked[-1]
    what = (
        "recalls the most trained numbers"
        if key == "probe_numeric_recall"
        else "answers trained questions best"
    )
    untrained = [s for s in ranked if not s.startswith("tuned")]
    tail = ""
    if not top.startswith("tuned") and top != low:
        tail = " with no training at all"
    elif top.startswith("tuned") and untrained:
        u = untrained[0]
        tail = f"; the best without training is {u} ({_pct(metrics[u][key])})"
    return f"On trained (probe) questions {top} {what} ({_pct(metrics[top][key])}){tail}."


def _cost_sentence(metrics: dict, systems: list[str]) -> str | None:
    key = _first_shared(metrics, systems, ("prompt_tokens",))
    if key is None:
        return None
    cheap = min(systems, key=lambda s: metrics[s][key])
    dear = max(systems, key=lambda s: metrics[s][key])
    out = f"Cheapest to ask: {cheap} ({metrics[cheap][key]:.0f} prompt tokens per answer"
    if metrics[cheap].get("latency_p50_s") is not None:
        out += f", p50 latency {metrics[cheap]['latency_p50_s']:.3g} s"
    out += ")"
    if dear != cheap:
        out += f"; {dear} costs the most ({metrics[dear][key]:.0f} prompt tokens)"
    trained = [s for s in systems if metrics[s].get("train_seconds") is not None]
    if trained:
        out += f"; fine-tuning cost {metrics[trained[0]]['train_seconds'] / 60:.1f} min of training once"
    return out + "."


def _combine_sentence(metrics: dict, systems: list[str]) -> str | None:
    trio = ["tuned+rag", "tuned", "base+rag"]
    if not all(s in systems for s in trio):
        return None
    key = _first_shared(metrics, trio, QUALITY)
    if key is None:
        return None
    both, ft, rag = (metrics[s][key] for s in trio)
    if both > max(ft, rag):
        return (
            f"RAG and fine-tuning combine: tuned+rag ({both:.3g}) beats both tuned ({ft:.3g}) "
            f"and base+rag ({rag:.3g}) on {LABELS[key]}."
        )
    better = "tuned" if ft >= rag else "base+rag"
    return (
        f"RAG and fine-tuning do not combine here: tuned+rag ({both:.3g}) does not beat {better} "
        f"({max(ft, rag):.3g}) on {LABELS[key]}."
    )


def verdict(metrics: dict) -> str:
    """One plain-language paragraph computed from metrics.json: quality, probe recall, cost, RAG + tuning."""
    systems = sides_of(metrics)
    if not systems:
        return ""
    parts = [
        _quality_sentence(metrics, systems),
        _probe_sentence(metrics, systems),
        _cost_sentence(metrics, systems),
        _combine_sentence(metrics, systems),
    ]
    return " ".join(p for p in parts if p)
