"""Bench: what each compared system costs per answer: prompt tokens, answer tokens, p50/p95 latency.

The systems of eval.systems (base, +fewshot, +rag, tuned, endpoints) answer the same first --n test questions
through compare's own machinery (no scoring), so a user can weigh each system's quality in the report against
its cost here. Tuned systems need the run's final/ (train first); without it they are skipped with a note.
    HF_HUB_OFFLINE=1 .venv/bin/python bench/systems_cost.py [configs/quickstart.yaml] [--n 20] [key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunesmith.config import UserError, load_config
from tunesmith.data.pipeline import build
from tunesmith.eval.addons import prepare_addons
from tunesmith.eval.compare import answer_systems, final_dir
from tunesmith.eval.questions import eval_sets, stored_template
from tunesmith.eval.systems import cost_summary, systems_of
from tunesmith.model.load import load_tokenizer
from tunesmith.retrieve.embed import load_embedder


def main() -> None:
    """Answer --n questions with every system and print a cost table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    ap.add_argument("--n", type=int, default=20, help="test questions each system answers")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.batch_size=8")
    args = ap.parse_args()
    cfg = load_config(Path(args.config), [*args.overrides, f"eval.limit={args.n}", "eval.probe=0"])
    run = Path(cfg.out_dir)
    systems = systems_of(cfg)
    try:
        tuned = final_dir(run, cfg.eval.checkpoint)
    except UserError as e:
        print(f"note: tuned systems skipped ({e})")
        tuned, systems = None, [s for s in systems if s.model != "tuned"]
    tok = load_tokenizer(cfg.model)
    data = build(cfg, tok, run)
    template = (stored_template(tuned) if tuned is not None else None) or data.template
    test, probe = eval_sets(cfg, data, template, tok)
    embedder, _ = load_embedder(cfg.eval.embedding_model)
    addons, retrieval = prepare_addons(cfg, data, test, probe, systems, tok, run, embedder)
    answers = answer_systems(cfg, tuned, tok, systems, (test, probe), addons, template)
    table = Table(title=f"cost per answer: {len(test.examples)} questions, batch {cfg.eval.batch_size}")
    for col in ("system", "prompt tokens", "answer tokens", "p50 s", "p95 s", "s/answer (throughput)"):
        table.add_column(col, justify="right" if col != "system" else "left")
    for name, a in answers.items():
        c = cost_summary(a)
        cells = [c["prompt_tokens"], c["completion_tokens"], c["latency_p50_s"], c["latency_p95_s"]]
        cells.append(c["seconds_per_answer"])
        table.add_row(name, *("—" if v is None else f"{v:.3g}" for v in cells))
    Console().print(table)
    if retrieval.get("retrieval_ms") is not None:
        print(f"retrieval: {retrieval['retrieval_ms']:.2f} ms per question ({cfg.eval.rag.retriever})")


if __name__ == "__main__":
    main()
