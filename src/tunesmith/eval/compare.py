"""Every way to specialise a model on the same prompts (`tunesmith compare`); one model (`tunesmith eval`).

`eval.systems` lists what is compared (eval/systems.py): the base model and the run's tuned model (final/,
or best/ with eval.checkpoint=best), each zero-shot or with few-shot pairs and/or retrieved passages in the
prompt (eval/prompts.py, eval/addons.py), and OpenAI-compatible endpoints. All answer the same test questions
and the optional held-in probe (the first `eval.probe` TRAINING questions: did the model learn the facts it
was shown?), rendered with the template stored with the run, with the same greedy settings. Each answer gets
text metrics and error buckets (eval/scoring.py); each system its means, corpus BLEU, costs per answer
(prompt tokens, latency), loss/perplexity when it is a local model asked with the training prompt, and
training time for tuned systems.
A PEFT adapter costs one model load: base systems answer with the adapter switched off (`disable_adapter`).
With eval.time_budget, answering goes a chunk of questions at a time across every system (eval/answering.py)
and stops before the budget; metrics.json's "answered" says how many were asked; every metric is over those.
Writes <run>/eval/: predictions.jsonl, probe_predictions.jsonl, metrics.json, report.html (+ its PNGs).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tunesmith.config import Config, ModelConfig, UserError
from tunesmith.data.pipeline import build, build_heldout
from tunesmith.eval.answering import (
    Budgeted,
    answer_budgeted,
    is_adapter,
    load_adapter,
    load_full,
    recall_over,
    tail_estimator,
)
from tunesmith.eval.loss import evaluate_loss
from tunesmith.eval.questions import Questions, eval_sets, stored_template, subset
from tunesmith.eval.report import write_report
from tunesmith.eval.scoring import deltas, score_probe, score_test, summarize
from tunesmith.eval.summary import print_summary
from tunesmith.eval.systems import (
    LOCAL_MODELS,
    Addons,
    Answers,
    System,
    answer_endpoint,
    answer_local,
    eval_generate_config,
    systems_of,
)
from tunesmith.eval.verdict import pairwise, verdict
from tunesmith.model.export import ADAPTER_CONFIG
from tunesmith.model.load import load_tokenizer, pad_id
from tunesmith.retrieve.embed import load_embedder
from tunesmith.runtime import autocast_dtype, device, print0

__all__ = ["compare", "evaluate", "eval_generate_config", "score_probe", "score_test"]

EVAL_DIR = "eval"


# ---------------------------------------------------------------- running the models


def answer(model, tok, test: Questions, probe: Questions, cfg: Config, label: str) -> Answers:
    """Greedy answers to the test questions and the probe with the training prompt, then answer-token loss."""
    print0(label)
    return answer_local(model, tok, System(label, "base"), test, probe, Addons(), cfg, None)


def _release(dev: torch.device) -> None:
    """Give a freed model's memory back before the next one loads."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def final_dir(run: Path, checkpoint: str = "final") -> Path:
    """<run>/final (or <run>/best: eval.checkpoint=best), checked: a full HF model dir or a PEFT adapter dir;
    UserError when training has not written it."""
    final = Path(run) / checkpoint
    if not (final / "config.json").is_file() and not (final / ADAPTER_CONFIG).is_file():
        if checkpoint == "best":
            raise UserError(
                f"{run}: eval.checkpoint=best but {final} holds no model (train with train.select set, "
                "or compare eval.checkpoint=final)"
            )
        raise UserError(f"{run}: no trained model in {final} (run `tunesmith train` with this config first)")
    return final


def with_models(
    cfg: Config, final: Path | None, dev: torch.device, fn: Callable, wanted: tuple[str, ...] = LOCAL_MODELS
) -> dict:
    """{"base": fn(model, "base"), "tuned": ...} for the wanted models, each loaded once.

    Adapter: one load, base through `disable_adapter()`. Full model: base, free, tuned.
    """
    out: dict = {}
    if is_adapter(final, wanted):
        model = load_adapter(cfg, final, dev)
        if "base" in wanted:
            with (
                model.disable_adapter()
            ):  # the untouched base weights: LoRA's delta is skipped in every layer
                print0(f"base: {cfg.model.name}, adapter off")
                out["base"] = fn(model, "base")
        print0(f"tuned: {final}, adapter on")
        out["tuned"] = fn(model, "tuned")
        return out
    for which in wanted:
        model = load_full(cfg, final, which, dev)
        out[which] = fn(model, which)
        del model
        _release(dev)
    return out


def answer_systems(
    cfg: Config,
    final: Path | None,
    tok,
    systems: list[System],
    qs: tuple[Questions, Questions],
    addons,
    template,
) -> dict[str, Answers]:
    """Every system's answers, in eval.systems order: local ones grouped by model, then the endpoints."""
    test, probe = qs
    wanted = tuple(m for m in LOCAL_MODELS if any(s.model == m for s in systems))

    def run_model(model, which: str) -> dict[str, Answers]:
        mine = [s for s in systems if s.model == which]
        return {s.name: answer_local(model, tok, s, test, probe, addons, cfg, template) for s in mine}

    got: dict[str, Answers] = {}
    for per_model in with_models(cfg, final, device(), run_model, wanted).values():
        got.update(per_model)
    for s in systems:
        if not s.local:
            got[s.name] = answer_endpoint(s, test, probe, addons, cfg)
    return {s.name: got[s.name] for s in systems}


def compare_text(cfg: Config, run: Path, final: Path, dev: torch.device) -> dict:
    """Raw text (continued pretraining): held-out loss and perplexity, base vs tuned; nothing to answer."""
    tok = load_tokenizer(cfg.model)
    data = (build_heldout if cfg.data.streaming else build)(cfg, tok, run)
    if not data.test:
        raise UserError(
            f"{run}: no held-out text to score "
            "(set data.test_path, or data.test_size for a non-streamed corpus)"
        )
    pad = pad_id(tok)
    amp = autocast_dtype(cfg.train.precision, dev)

    def score(model, which: str) -> dict:
        print0(f"{which}: perplexity over {len(data.test)} held-out blocks")
        return evaluate_loss(
            model, data.test, cfg.eval.batch_size, cfg.data.max_length, pad, cfg.data.packing, dev, amp
        )

    both = with_models(cfg, final, dev, score)
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


def training_costs(run: Path) -> dict:
    """What training the tuned model cost, from plan.json's measured side (else train_result.json)."""
    out: dict = {}
    plan = Path(run) / "plan.json"
    if plan.is_file():
        measured = json.loads(plan.read_text()).get("measured") or {}
        if measured.get("wall_time_s") is not None:
            out["train_seconds"] = measured["wall_time_s"]
        if measured.get("peak_memory_bytes") is not None:
            out["train_peak_memory_gb"] = measured["peak_memory_bytes"] / 2**30
    result = Path(run) / "train_result.json"
    if "train_seconds" not in out and result.is_file():
        seconds = json.loads(result.read_text()).get("train_seconds")
        if seconds is not None:
            out["train_seconds"] = seconds
    return out


def write_outputs(
    out: Path, metrics: dict, rows: list[dict], probe_rows: list[dict], metrics_log: Path | None, title: str
) -> Path:
    """predictions.jsonl, probe_predictions.jsonl (when probed), metrics.json, report.html -> its path."""
    out.mkdir(parents=True, exist_ok=True)
    for name, items in (("predictions.jsonl", rows), ("probe_predictions.jsonl", probe_rows)):
        if items or name == "predictions.jsonl":
            with (out / name).open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return write_report(out, metrics, rows, metrics_log, title, probe_rows)


# ---------------------------------------------------------------- the two commands


def compare(cfg: Config, run_dir: Path | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Every system of eval.systems on the same prompts; writes <run>/eval/ and returns metrics.json.

    `clock`: seconds, read for eval.time_budget (which counts from here to the written report)."""
    from tunesmith.eval.addons import prepare_addons

    t0 = clock()
    run = Path(run_dir if run_dir is not None else cfg.out_dir)
    systems = systems_of(cfg)
    uses_tuned = any(s.model == "tuned" for s in systems)
    tuned = final_dir(run, cfg.eval.checkpoint) if uses_tuned or cfg.data.format == "text" else None
    if cfg.data.format == "text":
        return compare_text(cfg, run, tuned, device())
    tok = load_tokenizer(cfg.model)
    data = build(cfg, tok, run)  # the run's cached splits when the data, template and tokenizer are unchanged
    template = (stored_template(tuned) if tuned is not None else None) or data.template
    test, probe = eval_sets(cfg, data, template, tok)
    embedder, note = load_embedder(cfg.eval.embedding_model)
    addons, retrieval = prepare_addons(cfg, data, test, probe, systems, tok, run, embedder)
    out = run / EVAL_DIR
    budgeted: Budgeted | None = None
    if cfg.eval.time_budget is None:
        answers = answer_systems(cfg, tuned, tok, systems, (test, probe), addons, template)
    else:
        tail = tail_estimator(cfg, (test, probe), systems, out, embedder, clock)
        answers, budgeted = answer_budgeted(
            cfg, tuned, tok, systems, (test, probe), addons, template, lambda: clock() - t0, tail, device()
        )
        _release(device())
        n_test, _, n_probe, _ = budgeted.counts()
        test, probe = subset(test, range(n_test)), subset(probe, range(n_probe))
        retrieval = recall_over(retrieval, addons, data, probe, cfg)
    if cfg.eval.lm_eval is not None:  # after generation: lm-eval loads each model itself
        from tunesmith.model.resolve import resolve

        for s in systems:
            if s.local and s.plain:
                path = str(resolve(cfg.model.name, cfg.model.cache_dir)) if s.model == "base" else str(tuned)
                answers[s.name].lm_eval = lm_eval_of(cfg, path, out / f"lm_eval_{s.model}", device())
    notes = ([note] if note else []) + addons.notes + (_adapter_note(cfg.model, tuned) if tuned else [])
    metrics, rows, probe_rows = summarize(cfg, answers, test, probe, out, notes, embedder)
    trained = training_costs(run) if tuned is not None else {}
    for s in systems:
        metrics[s.name].update(trained if s.model == "tuned" else {})
        metrics[s.name].update(retrieval if s.rag else {})
    metrics["systems"] = [s.name for s in systems]
    metrics["models"] = {s.name: _model_of(cfg, s, tuned) for s in systems}
    metrics["pairwise"] = pairwise(rows, probe_rows, metrics["systems"])
    metrics["verdict"] = verdict(metrics)
    if budgeted is not None:
        metrics["answered"] = budgeted.to_dict()  # the table (compare_cli) and the report print its line
    write_outputs(out, metrics, rows, probe_rows, run / "metrics.jsonl", f"tunesmith compare: {run.name}")
    if budgeted is not None:
        ended = clock() - t0
        metrics["answered"]["compare_s"] = ended  # measured after the report: metrics.json gets it too
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics


def _model_of(cfg: Config, system: System, tuned: Path | None) -> str:
    """What a system's model is, for the report: base name, tuned dir, or the endpoint's model at its URL."""
    if system.model == "base":
        return cfg.model.name
    if system.model == "tuned":
        return str(tuned)
    ep = cfg.eval.endpoints[system.model.split(":", 1)[1]]
    return f"{ep.model} at {ep.base_url}"


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
    embedder, note = load_embedder(cfg.eval.embedding_model)
    metrics, rows, probe_rows = summarize(cfg, answers, test, probe, out, [note] if note else [], embedder)
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
    """`tunesmith eval config.yaml model.name=...`: evaluate one model, print the table and report path."""
    metrics = evaluate(cfg)
    print_summary(metrics, console)
    console.print(f"report: {Path(cfg.out_dir) / EVAL_DIR / 'report.html'}")
    return metrics
