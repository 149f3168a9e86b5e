"""The evals the training loop runs: held-out loss and perplexity and, when train.select asks, the probe.

Periodic evals (train.eval_every) cover the first train.eval_limit held-out examples; the last eval covers all
of them, in two parts, so that the part every periodic eval saw is what best/ is chosen on (evals compared
with each other always cover the same examples). The probe (train.select=probe_recall or probe_em) asks the
first eval.probe training questions greedily, as `tunesmith compare` does, and is off otherwise: generation
costs far more than a forward pass.
"""

from __future__ import annotations

import math
import time

from tunesmith.eval.loss import evaluate_loss
from tunesmith.runtime import autocast, print0
from tunesmith.train import select
from tunesmith.train.log import read_metrics
from tunesmith.train.prepare import Run

# train.select name -> the key of the probe summary (eval/scoring.py) that holds it
PROBE_METRICS = {"probe_recall": "probe_numeric_recall", "probe_em": "probe_exact_match"}


def _loss(r: Run, samples: list[dict]) -> dict:
    tc, d = r.cfg.train, r.dist
    return evaluate_loss(
        r.model,
        samples,
        tc.batch_size,
        r.cfg.data.max_length,
        r.pad_id,
        r.cfg.data.packing,
        r.dev,
        r.amp,
        shard=(d.rank, d.world),
    )


def heldout(r: Run, last: bool) -> tuple[dict, dict]:
    """(this eval's results, the results selection compares): loss, perplexity, tokens, examples."""
    test, limit = r.data.test, r.cfg.train.eval_limit
    head = test[:limit] if limit else test
    first = {**_loss(r, head), "examples": len(head)}
    if not last or len(head) == len(test):
        return first, first
    rest = _loss(r, test[len(head) :])
    tokens = first["tokens"] + rest["tokens"]
    loss = (first["loss"] * first["tokens"] + rest["loss"] * rest["tokens"]) / max(tokens, 1)
    whole = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "examples": len(test)}
    return {**whole, "eval_limit": first}, first


def probe(r: Run) -> dict:
    """probe_recall and probe_em of greedy answers to the first eval.probe training questions."""
    from tunesmith.eval.questions import questions_for
    from tunesmith.eval.scoring import score_probe
    from tunesmith.eval.systems import eval_generate_config
    from tunesmith.generate import generate

    qs = questions_for(r.data.train_examples[: r.cfg.eval.probe], [], r.data.template, r.tok)
    model, was_training = r.core, r.core.training
    model.eval()  # no dropout; generate forks the RNG, so training draws the same numbers with or without it
    try:
        with autocast(r.amp, r.dev):
            completions = generate(model, r.tok, qs.prompts, eval_generate_config(r.cfg))
    finally:
        model.train(was_training)
    _, summary = score_probe(qs, completions)
    return {name: summary.get(key) for name, key in PROBE_METRICS.items()}


def evaluate(r: Run, last: bool, metric: str) -> tuple[dict, dict]:
    """heldout(), plus the probe's metrics when `metric` (train.select) is one of them, and the seconds the
    eval took (what train.eval_every and train.eval_limit cost)."""
    t0 = time.time()
    results, compared = heldout(r, last)
    if metric in PROBE_METRICS:
        found = probe(r)
        results, compared = {**results, **found}, {**compared, **found}
    return {**results, "seconds": round(time.time() - t0, 3)}, compared


def print_curve(r: Run, sel: select.Selection) -> None:
    """The held-out curve this run trained through and the step best/ keeps (two evals or more)."""
    rows = [row for row in read_metrics(r.dir / "metrics.jsonl") if row.get("split") == "eval"]
    if len(rows) >= 2:
        print0(select.format_curve(rows, sel, r.dir / "best"))
    elif sel.step is not None and not r.eval_every:
        print0("note: train.eval_every=0: the final eval is the only one, so best/ is final/ (hard links)")
