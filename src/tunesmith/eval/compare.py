"""Base vs fine-tuned on the same prompts (`tunesmith compare`) and one model alone (`tunesmith eval`).

Both models answer the same test questions, rendered with the template stored with the run
(final/tunesmith_template.json), with the same greedy settings. Each answer gets text metrics and error
buckets; each model gets answer-token loss/perplexity, corpus BLEU and bucket counts (plus judge and
lm-eval when configured). An optional held-in probe asks the first `eval.probe` TRAINING questions: did the
model learn the facts it was shown? A PEFT adapter costs one model load: the base answers with the adapter
switched off (`disable_adapter`), the tuned model with it on. What is asked (test questions, probe, the
template): eval/questions.py.
Writes <run>/eval/: predictions.jsonl, probe_predictions.jsonl, metrics.json, report.html (+ its PNGs).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import Config, GenerateConfig, ModelConfig, UserError
from tunesmith.data.pipeline import build, build_heldout
from tunesmith.eval.buckets import bucket_counts, buckets
from tunesmith.eval.loss import evaluate_loss
from tunesmith.eval.metrics import (
    aggregate,
    bleu,
    load_embedder,
    numeric_match,
    parse_numbers,
    score_examples,
)
from tunesmith.eval.questions import Questions, eval_sets, stored_template
from tunesmith.eval.report import print_summary, write_report
from tunesmith.generate import Completion, generate
from tunesmith.model.load import load_model, load_tokenizer, pad_id
from tunesmith.runtime import autocast_dtype, device, print0

EVAL_DIR = "eval"
ADAPTER_CONFIG = "adapter_config.json"
# Per-example metrics averaged over the probe and reported as probe_<name> (numeric recall comes first).
PROBE_METRICS = ("exact_match", "token_f1", "rouge_l")


@dataclass
class Answers:
    """One model's outputs: completions for the test questions and the probe, loss, lm-eval, timing."""

    test: list[Completion]
    probe: list[Completion]
    loss: dict
    seconds: float
    lm_eval: dict = field(default_factory=dict)


# ---------------------------------------------------------------- running one model


def eval_generate_config(cfg: Config) -> GenerateConfig:
    """cfg.generate, greedy, with the eval answer cap and batch size: identical for every model compared."""
    return cfg.generate.model_copy(
        update={
            "max_new_tokens": cfg.eval.max_new_tokens,
            "temperature": 0.0,
            "batch_size": cfg.eval.batch_size,
        }
    )


def answer(model, tok, test: Questions, probe: Questions, cfg: Config, label: str) -> Answers:
    """Greedy answers to the test questions and the probe in one batched pass, then answer-token loss."""
    dev = next(model.parameters()).device
    print0(
        f"{label}: answering {len(test.prompts)} test questions"
        + (f" + {len(probe.prompts)} probe" if probe.prompts else "")
    )
    t0 = time.time()
    out = generate(model, tok, test.prompts + probe.prompts, eval_generate_config(cfg), progress=True)
    seconds = time.time() - t0
    pad = pad_id(tok)
    loss = (
        evaluate_loss(
            model,
            test.samples,
            cfg.eval.batch_size,
            cfg.data.max_length,
            pad,
            cfg.data.packing,
            dev,
            autocast_dtype(cfg.train.precision, dev),
        )
        if test.samples
        else {}
    )
    return Answers(out[: len(test.prompts)], out[len(test.prompts) :], loss, seconds)


def _release(dev: torch.device) -> None:
    """Give a freed model's memory back before the next one loads."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def final_dir(run: Path) -> Path:
    """<run>/final, checked: a full HF model dir or a PEFT adapter dir; UserError when training has not finished."""
    final = Path(run) / "final"
    if not (final / "config.json").is_file() and not (final / ADAPTER_CONFIG).is_file():
        raise UserError(f"{run}: no trained model in {final} (run `tunesmith train` with this config first)")
    return final


def with_both(cfg: Config, final: Path, dev: torch.device, fn: Callable) -> dict:
    """{"base": fn(model, label), "tuned": ...}. Adapter: one load, base through `disable_adapter()`. Full: base, free, tuned."""
    if (final / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        quantize = cfg.lora.quantize if cfg.lora else None
        model = PeftModel.from_pretrained(load_model(cfg.model, dev, quantize=quantize), str(final)).eval()
        with model.disable_adapter():  # the untouched base weights: LoRA's delta is skipped in every layer
            base = fn(model, f"base ({cfg.model.name}, adapter off)")
        return {"base": base, "tuned": fn(model, f"tuned ({final}, adapter on)")}
    model = load_model(cfg.model, dev).eval()
    base = fn(model, f"base ({cfg.model.name})")
    del model
    _release(dev)
    model = load_model(cfg.model.model_copy(update={"name": str(final)}), dev).eval()
    tuned = fn(model, f"tuned ({final})")
    del model
    _release(dev)
    return {"base": base, "tuned": tuned}


def answer_both(
    cfg: Config, final: Path, tok, test: Questions, probe: Questions, dev: torch.device
) -> dict[str, Answers]:
    """Base and tuned answers to the same prompts."""
    return with_both(cfg, final, dev, lambda model, label: answer(model, tok, test, probe, cfg, label))


def compare_text(cfg: Config, run: Path, final: Path, dev: torch.device) -> dict:
    """Raw text (continued pretraining): held-out loss and perplexity, base vs tuned; no questions to answer."""
    tok = load_tokenizer(cfg.model)
    data = (build_heldout if cfg.data.streaming else build)(cfg, tok, run)
    if not data.test:
        raise UserError(
            f"{run}: no held-out text to score (set data.test_path, or data.test_size for a non-streamed corpus)"
        )
    pad = pad_id(tok)
    amp = autocast_dtype(cfg.train.precision, dev)

    def score(model, label: str) -> dict:
        print0(f"{label}: perplexity over {len(data.test)} held-out blocks")
        return evaluate_loss(
            model, data.test, cfg.eval.batch_size, cfg.data.max_length, pad, cfg.data.packing, dev, amp
        )

    both = with_both(cfg, final, dev, score)
    metrics = {
        "base": both["base"],
        "tuned": both["tuned"],
        "delta": deltas(both["base"], both["tuned"]),
        "notes": [
            f"loss/perplexity: every token of the held-out text ({cfg.data.test_path or 'test split'})"
        ],
        "models": {"base": cfg.model.name, "tuned": str(final)},
    }
    write_outputs(run / EVAL_DIR, metrics, [], [], run / "metrics.jsonl", f"tunesmith compare: {run.name}")
    return metrics


def lm_eval_of(cfg: Config, model_path: str, out: Path, dev: torch.device) -> dict:
    """lm-eval results flattened to {'lm_eval.<task>.<metric>': value} ({} when not configured)."""
    if cfg.eval.lm_eval is None:
        return {}
    from tunesmith.eval.lm_eval import run_lm_eval

    results = run_lm_eval(model_path, cfg.eval.lm_eval, dev.type, out)
    return {f"lm_eval.{task}.{name}": v for task, metrics in results.items() for name, v in metrics.items()}


# ---------------------------------------------------------------- scoring


def score_test(
    cfg: Config, qs: Questions, completions: list[Completion], embedder, cache: Path
) -> tuple[list[dict], dict]:
    """Per-example {answer, metrics, buckets, ...} and the model's summary (means, corpus BLEU, bucket counts)."""
    preds = [c.text for c in completions]
    metrics = score_examples(preds, qs.references, qs.questions, embedder)
    rows = [
        {
            "answer": c.text,
            "metrics": m,
            "buckets": buckets(c.text, r, q, c.finish_reason == "length"),
            "finish_reason": c.finish_reason,
            "completion_tokens": len(c.ids),
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
    """Held-in probe: numeric recall (the row's `value`, else every number of the reference) + text overlap."""
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


def summarize(
    cfg: Config, answers: dict[str, Answers], test: Questions, probe: Questions, out: Path, notes: list[str]
) -> tuple[dict, list[dict], list[dict]]:
    """(metrics.json dict, prediction rows, probe rows) for one or two models."""
    embedder, note = load_embedder(cfg.eval.embedding_model)
    notes += [note] if note else []
    metrics: dict = {}
    rows = [
        {"where": ex.where, "prompt": p, "question": q, "reference": r}
        for ex, p, q, r in zip(test.examples, test.prompt_texts, test.questions, test.references, strict=True)
    ]
    probe_rows = [
        {"where": ex.where, "prompt": p, "question": q, "reference": r, "value": v}
        for ex, p, q, r, v in zip(
            probe.examples, probe.prompt_texts, probe.questions, probe.references, probe.values, strict=True
        )
    ]
    for side, a in answers.items():
        per, summary = score_test(cfg, test, a.test, embedder, out / "judge_cache.jsonl")
        if a.loss:
            summary["loss"], summary["perplexity"] = a.loss["loss"], a.loss["perplexity"]
        probe_per, probe_summary = score_probe(probe, a.probe)
        metrics[side] = {**summary, **probe_summary, **a.lm_eval}
        for row, r in zip(rows, per, strict=True):
            row[side] = r
        for row, r in zip(probe_rows, probe_per, strict=True):
            row[side] = r
        notes.append(f"{side}: {a.seconds:.1f} s to answer {len(a.test) + len(a.probe)} questions")
    if test.samples:
        notes.append(
            f"loss/perplexity: over the answer tokens of the {len(test.samples)} evaluated test examples"
        )
    if probe.examples:
        notes.append(
            f"probe: the first {len(probe.examples)} training questions; probe_numeric_recall counts only "
            "those whose reference has a number (the row's `value` field when present)"
        )
    notes.append(
        f"generation: greedy, max_new_tokens={cfg.eval.max_new_tokens}, batch {cfg.eval.batch_size}; "
        "an answer that hits the cap lands in the no_eos bucket"
    )
    if "base" in metrics and "tuned" in metrics:
        metrics["delta"] = deltas(metrics["base"], metrics["tuned"])
    metrics["notes"] = notes
    return metrics, rows, probe_rows


def write_outputs(
    out: Path, metrics: dict, rows: list[dict], probe_rows: list[dict], metrics_log: Path | None, title: str
) -> Path:
    """predictions.jsonl, probe_predictions.jsonl (when probed), metrics.json and report.html; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    for name, items in (("predictions.jsonl", rows), ("probe_predictions.jsonl", probe_rows)):
        if items or name == "predictions.jsonl":
            with (out / name).open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return write_report(out, metrics, rows, metrics_log, title)


# ---------------------------------------------------------------- the two commands


def compare(cfg: Config, run_dir: Path | None = None) -> dict:
    """Base (cfg.model.name) vs the run's final/ on the same prompts; writes <run>/eval/ and returns metrics.json."""
    run = Path(run_dir if run_dir is not None else cfg.out_dir)
    final = final_dir(run)
    dev = device()
    if cfg.data.format == "text":
        return compare_text(cfg, run, final, dev)
    tok = load_tokenizer(cfg.model)
    data = build(cfg, tok, run)  # the run's cached splits when the data, template and tokenizer are unchanged
    template = stored_template(final) or data.template
    test, probe = eval_sets(cfg, data, template, tok)
    answers = answer_both(cfg, final, tok, test, probe, dev)
    out = run / EVAL_DIR
    if cfg.eval.lm_eval is not None:  # after generation: lm-eval loads each model itself
        from tunesmith.model.resolve import resolve

        answers["base"].lm_eval = lm_eval_of(
            cfg, str(resolve(cfg.model.name, cfg.model.cache_dir)), out / "lm_eval_base", dev
        )
        answers["tuned"].lm_eval = lm_eval_of(cfg, str(final), out / "lm_eval_tuned", dev)
    notes = _adapter_note(cfg.model, final)
    metrics, rows, probe_rows = summarize(cfg, answers, test, probe, out, notes)
    metrics["models"] = {"base": cfg.model.name, "tuned": str(final)}
    write_outputs(out, metrics, rows, probe_rows, run / "metrics.jsonl", f"tunesmith compare: {run.name}")
    return metrics


def _adapter_note(model: ModelConfig, final: Path) -> list[str]:
    """A note when the adapter was trained on a base named differently from model.name."""
    path = final / ADAPTER_CONFIG
    if not path.is_file():
        return []
    recorded = json.loads(path.read_text()).get("base_model_name_or_path")
    if recorded and recorded != model.name:
        return [f"adapter was trained on '{recorded}', compared against model.name '{model.name}'"]
    return []


def model_dir_of(name: str) -> Path | None:
    """A run dir's final/, or a local model dir itself; None for hub ids and packaged short names."""
    p = Path(name)
    if (p / "final").is_dir():
        return p / "final"
    return p if p.is_dir() else None


def evaluate(cfg: Config) -> dict:
    """One model (cfg.model.name: base, hub id, or <run>/final) on the test split; writes <out_dir>/eval/."""
    from tunesmith.model.export import load_for_inference

    out_dir = Path(cfg.out_dir)
    dev = device()
    model, tok, _ = load_for_inference(cfg.model.name, cfg.model, dev)
    local = model_dir_of(cfg.model.name)
    stored = stored_template(local) if local is not None else None
    data = build(cfg, tok, out_dir)
    template = stored or data.template
    test, probe = eval_sets(cfg, data, template, tok)
    # a tunesmith output (it carries its template) is the "tuned" side of the report, anything else the base
    side = "tuned" if stored is not None else "base"
    answers = {side: answer(model, tok, test, probe, cfg, cfg.model.name)}
    del model
    _release(dev)
    out = out_dir / EVAL_DIR
    if cfg.eval.lm_eval is not None:
        from tunesmith.model.resolve import resolve

        path = str(local) if local is not None else str(resolve(cfg.model.name, cfg.model.cache_dir))
        answers[side].lm_eval = lm_eval_of(cfg, path, out / "lm_eval", dev)
    metrics, rows, probe_rows = summarize(cfg, answers, test, probe, out, [])
    metrics["models"] = {side: cfg.model.name}
    log = out_dir / "metrics.jsonl"
    write_outputs(
        out, metrics, rows, probe_rows, log if log.is_file() else None, f"tunesmith eval: {cfg.model.name}"
    )
    return metrics


def compare_cli(cfg: Config, console) -> dict:
    """`tunesmith compare config.yaml`: run compare, print the summary table and where the report is."""
    metrics = compare(cfg)
    print_summary(metrics, console)
    console.print(f"report: {Path(cfg.out_dir) / EVAL_DIR / 'report.html'}")
    return metrics


def evaluate_cli(cfg: Config, console) -> dict:
    """`tunesmith eval config.yaml model.name=...`: evaluate one model, print the table and the report path."""
    metrics = evaluate(cfg)
    print_summary(metrics, console)
    console.print(f"report: {Path(cfg.out_dir) / EVAL_DIR / 'report.html'}")
    return metrics
