"""Scoring every system's answers: per-example metrics and buckets, per-system means, costs, and deltas.

metrics.json keeps one entry per system under its name ("base", "tuned", "tuned+rag", ...), with `delta`
(tuned - base) when both are there, and `notes`. Prediction rows carry one entry per system too.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config
from tunesmith.eval.buckets import bucket_counts, buckets
from tunesmith.eval.metrics import aggregate, bleu, numeric_match, parse_numbers, score_examples
from tunesmith.eval.questions import Questions
from tunesmith.eval.systems import Answers, cost_summary
from tunesmith.generate import Completion

# Per-example metrics averaged over the probe and reported as probe_<name> (numeric recall comes first).
PROBE_METRICS = ("exact_match", "token_f1", "rouge_l")


def score_test(
    cfg: Config, qs: Questions, completions: list[Completion], embedder, cache: Path
) -> tuple[list[dict], dict]:
    """Per-example {answer, metrics, buckets, ...} and the summary (means, corpus BLEU, bucket counts)."""
    preds = [c.text for c in completions]
    metrics = score_examples(preds, qs.references, qs.questions, embedder)
    rows = [
        {
            "answer": c.text,
            "metrics": m,
            "buckets": buckets(c.text, r, q, c.finish_reason == "length"),
            "finish_reason": c.finish_reason,
        }
        for c, m, r, q in zip(completions, metrics, qs.references, qs.questions, strict=True)
    ]
    judged: dict = {}
    if cfg.eval.judge is not None:
        from tunesmith.eval.judge import judge, judge_summary

        items = [
            {"question": q, "reference": r, "answer": p}
            for q, r, p in zip(qs.questions, qs.references, preds, strict=True)
        ]
        results = judge(cfg.eval.judge, items, cache)
        for row, res in zip(rows, results, strict=True):
            row["metrics"]["judge_score"] = res["score"] if res else None
            row["judge_reason"] = res["reason"] if res else None
        judged = judge_summary(results)
    summary = aggregate([r["metrics"] for r in rows])
    summary.update(judged)
    summary["corpus_bleu"] = bleu(preds, qs.references) if preds else None
    summary["buckets"] = bucket_counts(r["buckets"] for r in rows)
    return rows, summary


def score_probe(qs: Questions, completions: list[Completion]) -> tuple[list[dict], dict]:
    """Held-in probe: numeric recall (the row's `value`, else every number of the reference), overlap."""
    preds = [c.text for c in completions]
    metrics = score_examples(preds, qs.references, qs.questions, None)
    rows = []
    for c, m, ref, q, value in zip(completions, metrics, qs.references, qs.questions, qs.values, strict=True):
        checkable = value is not None or bool(parse_numbers(ref))  # nothing to recall otherwise
        m["numeric_match"] = float(numeric_match(c.text, value, ref)) if checkable else None
        rows.append(
            {
                "answer": c.text,
                "metrics": m,
                "buckets": buckets(c.text, ref, q, c.finish_reason == "length"),
                "finish_reason": c.finish_reason,
            }
        )
    if not rows:
        return [], {}
    means = aggregate([r["metrics"] for r in rows])
    summary = {"probe_numeric_recall": means.get("numeric_match")}
    summary.update({f"probe_{k}": means.get(k) for k in PROBE_METRICS})
    summary["probe_n"] = len(rows)
    return rows, summary


def deltas(base: dict, tuned: dict) -> dict:
    """tuned - base for every numeric metric both have (nested dicts like buckets recurse); None otherwise."""
    out: dict = {}
    for k, b in base.items():
        t = tuned.get(k)
        if isinstance(b, dict) and isinstance(t, dict):
            out[k] = deltas(b, t)
        elif isinstance(b, (int, float)) and isinstance(t, (int, float)) and not isinstance(b, bool):
            out[k] = t - b
        elif k in tuned:
            out[k] = None
    return out


def _costs_into_rows(a: Answers, per: list[dict], probe_per: list[dict]) -> None:
    """Each answer's own cost next to its metrics: prompt tokens, completion tokens, latency."""
    for i, r in enumerate(per + probe_per):
        r["prompt_tokens"] = a.prompt_tokens[i] if i < len(a.prompt_tokens) else None
        r["completion_tokens"] = a.completion_tokens[i] if i < len(a.completion_tokens) else None
        r["latency_s"] = a.latencies[i] if i < len(a.latencies) else None


def question_rows(qs: Questions, probe: bool) -> list[dict]:
    """The per-question part of a predictions row (the systems' answers are added under their names)."""
    rows = []
    for i, ex in enumerate(qs.examples):
        row = {"where": ex.where, "prompt": qs.prompt_texts[i], "question": qs.questions[i]}
        row["reference"] = qs.references[i]
        if probe:
            row["value"] = qs.values[i]
        rows.append(row)
    return rows


def summarize(
    cfg: Config,
    answers: dict[str, Answers],
    test: Questions,
    probe: Questions,
    out: Path,
    notes: list[str],
    embedder,
) -> tuple[dict, list[dict], list[dict]]:
    """(metrics.json dict, prediction rows, probe rows) for every system answered, in `answers` order."""
    metrics: dict = {}
    rows, probe_rows = question_rows(test, False), question_rows(probe, True)
    for side, a in answers.items():
        per, summary = score_test(cfg, test, a.test, embedder, out / "judge_cache.jsonl")
        if a.loss:
            summary["loss"], summary["perplexity"] = a.loss["loss"], a.loss["perplexity"]
        probe_per, probe_summary = score_probe(probe, a.probe)
        _costs_into_rows(a, per, probe_per)
        metrics[side] = {**summary, **probe_summary, **cost_summary(a), **a.lm_eval}
        for row, r in zip(rows, per, strict=True):
            row[side] = r
        for row, r in zip(probe_rows, probe_per, strict=True):
            row[side] = r
        notes.append(f"{side}: {a.seconds:.1f} s to answer {len(a.test) + len(a.probe)} questions")
        if a.dropped_shots:
            notes.append(f"{side}: {a.dropped_shots} few-shot pairs dropped to fit the model's context")
    if test.samples:
        notes.append(
            f"loss/perplexity: over the answer tokens of the {len(test.samples)} evaluated test examples "
            "(local models asked with the training prompt only)"
        )
    if probe.examples:
        notes.append(
            f"probe: the first {len(probe.examples)} training questions; probe numeric recall counts only "
            "those whose reference has a number (the row's `value` field when present)"
        )
    notes.append(
        f"generation: greedy, max_new_tokens={cfg.eval.max_new_tokens}, batch {cfg.eval.batch_size}; "
        "an answer that hits the cap lands in the no_eos bucket; latency: each local answer waited for its "
        "whole batch, each endpoint answer for its request"
    )
    if "base" in metrics and "tuned" in metrics:
        metrics["delta"] = deltas(metrics["base"], metrics["tuned"])
    metrics["notes"] = notes
    return metrics, rows, probe_rows
