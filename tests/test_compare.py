"""`tunesmith compare` / `tunesmith eval` on tiny trained runs: files, schema, deltas, adapter, probe."""

import json
import math
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tests import tiny
from tunesmith.config import UserError, load_config
from tunesmith.data.formats import Example
from tunesmith.data.pipeline import build
from tunesmith.eval.compare import compare, compare_cli, eval_generate_config, evaluate, score_probe
from tunesmith.eval.loss import evaluate_loss
from tunesmith.eval.questions import Questions, eval_sets, stored_template
from tunesmith.generate import Completion, generate
from tunesmith.model.load import load_model, load_tokenizer
from tunesmith.runtime import autocast_dtype, device
from tunesmith.train.loop import train

EVAL = [
    "eval.limit=3",
    "eval.probe=3",
    "eval.max_new_tokens=8",
    "eval.batch_size=4",
    "eval.embedding_model=null",
]


def cfg_for(root, model_dir, data, *over):
    base = [
        f"model.name={model_dir}",
        f"data.path={data}",
        f"out_dir={root / 'run'}",
        "data.test_size=4",
        "data.max_length=64",
        "train.batch_size=4",
        "train.log_every=1",
        "train.scheduler=constant",
        *EVAL,
    ]
    return load_config(None, base + list(over))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return root, tiny.save_model_dir(root / "tiny-neox"), tiny.write_qa(root / "qa.jsonl")


@pytest.fixture(scope="module")
def full_run(setup):
    root, model_dir, data = setup
    cfg = cfg_for(root / "full", model_dir, data, "train.max_steps=12", "train.lr=5e-3")
    train(cfg)
    console = Console(record=True, width=200)
    metrics = compare_cli(
        cfg, console
    )  # the CLI's entry point: compare + the summary table + the report path
    return cfg, metrics, console.export_text()


@pytest.fixture(scope="module")
def lora_run(setup):
    root, model_dir, data = setup
    cfg = cfg_for(
        root / "lora",
        model_dir,
        data,
        "train.max_steps=12",
        "train.lr=1e-2",
        "lora.r=8",
        "lora.dropout=0.0",
        "eval.probe=0",
    )
    train(cfg)
    return cfg, compare(cfg)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_compare_full_run_writes_documented_files(full_run):
    cfg, metrics, _ = full_run
    ev = Path(cfg.out_dir) / "eval"
    assert {"predictions.jsonl", "probe_predictions.jsonl", "metrics.json", "report.html"} <= {
        p.name for p in ev.iterdir()
    }
    assert json.loads((ev / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert {"base", "tuned", "delta", "notes"} <= set(metrics)
    for side in ("base", "tuned"):
        m = metrics[side]
        assert m["n"] == 3 and m["probe_n"] == 3
        for key in (
            "exact_match",
            "token_f1",
            "rouge_l",
            "bleu",
            "corpus_bleu",
            "loss",
            "perplexity",
            "probe_numeric_recall",
            "probe_exact_match",
            "probe_rouge_l",
        ):
            assert key in m, (side, key)
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert sum(m["buckets"].values()) >= 0 and set(m["buckets"]) >= {"empty", "no_eos", "wrong_number"}
    # deltas are tuned - base, metric by metric (bucket counts included)
    b, t, d = flat(metrics["base"]), flat(metrics["tuned"]), flat(metrics["delta"])
    for k, v in d.items():
        if v is not None:
            assert v == pytest.approx(t[k] - b[k]), k
    assert d["loss"] < 0  # 30 steps on templated QA: held-out answer loss goes down
    rows = read_jsonl(ev / "predictions.jsonl")
    assert len(rows) == 3
    for row in rows:
        assert {"prompt", "question", "reference", "base", "tuned"} <= set(row)
        assert row["prompt"].startswith("### Question:") or row["question"] in row["prompt"]
        for side in ("base", "tuned"):
            assert {"answer", "metrics", "buckets"} <= set(row[side])
            # the no_eos bucket is exactly "generation hit eval.max_new_tokens"
            assert ("no_eos" in row[side]["buckets"]) == (row[side]["finish_reason"] == "length")
    html = (ev / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html


def test_probe_rows_are_the_first_training_questions(full_run):
    cfg, metrics, _ = full_run
    tok = load_tokenizer(cfg.model)
    data = build(cfg, tok, cfg.out_dir)
    probe = read_jsonl(Path(cfg.out_dir) / "eval" / "probe_predictions.jsonl")
    assert [p["where"] for p in probe] == [ex.where for ex in data.train_examples[:3]]
    recall = sum(p["tuned"]["metrics"]["numeric_match"] for p in probe) / 3  # every tiny answer has a number
    assert metrics["tuned"]["probe_numeric_recall"] == pytest.approx(recall)


def test_score_probe_uses_value_field_then_reference_numbers():
    def q(refs, values):
        exs = [Example(where=f"x:{i}", fields={"question": "q?", "answer": r}) for i, r in enumerate(refs)]
        return Questions(exs, [[1]] * len(refs), ["p"] * len(refs), ["q?"] * len(refs), refs, values)

    refs = ["Revenue was $34 million.", "It grew 22% to 1,200 staff.", "No numbers here."]
    answers = ["It was 34 dollars.", "22% and 1200", "anything"]
    done = [Completion([5], a, "stop", 1) for a in answers]
    rows, summary = score_probe(q(refs, [34.0, None, None]), done)
    assert [r["metrics"]["numeric_match"] for r in rows] == [1.0, 1.0, None]  # nothing to recall in the third
    assert summary["probe_numeric_recall"] == 1.0 and summary["probe_n"] == 3
    # the value field wins over the reference's text: 35 is not in "It was 34 dollars."
    rows, summary = score_probe(
        q(refs, [35.0, None, None]), [*done[:1], Completion([5], "22% only", "stop", 1), done[2]]
    )
    assert summary["probe_numeric_recall"] == 0.0
    assert summary["probe_exact_match"] == 0.0


def test_adapter_toggle_gives_the_base_model_alone(lora_run):
    cfg, metrics = lora_run
    run = Path(cfg.out_dir)
    assert (run / "final" / "adapter_config.json").is_file()
    rows = read_jsonl(run / "eval" / "predictions.jsonl")
    tok = load_tokenizer(cfg.model)
    data = build(cfg, tok, run)
    test, _ = eval_sets(cfg, data, stored_template(run / "final"), tok)
    dev = (
        device()
    )  # what compare ran on (CUDA when present: bf16 weights there, so the same device is a must)
    base = load_model(cfg.model, dev).eval()
    alone = generate(base, tok, test.prompts, eval_generate_config(cfg))
    assert [r["base"]["answer"] for r in rows] == [c.text for c in alone]
    pad = tok.pad_token_id
    loss = evaluate_loss(
        base,
        test.samples,
        4,
        cfg.data.max_length,
        pad,
        cfg.data.packing,
        dev,
        autocast_dtype(cfg.train.precision, dev),
    )
    assert metrics["base"]["loss"] == pytest.approx(loss["loss"], rel=1e-5)
    # and the adapter was really on for the tuned side (else the check above could not fail)
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert any(r["base"]["answer"] != r["tuned"]["answer"] for r in rows)


def test_eval_one_model_matches_compare(full_run, setup, tmp_path):
    cfg, metrics, _ = full_run
    final = Path(cfg.out_dir) / "final"
    single = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"name": str(final)}), "out_dir": str(tmp_path / "ev")}
    )
    got = evaluate(single)
    assert set(got) >= {"tuned", "notes"} and "base" not in got and "delta" not in got
    rows = read_jsonl(tmp_path / "ev" / "eval" / "predictions.jsonl")
    compared = read_jsonl(Path(cfg.out_dir) / "eval" / "predictions.jsonl")
    assert [r["tuned"]["answer"] for r in rows] == [r["tuned"]["answer"] for r in compared]
    assert got["tuned"]["loss"] == pytest.approx(metrics["tuned"]["loss"], rel=1e-5)
    assert (tmp_path / "ev" / "eval" / "report.html").is_file()
    # a plain base model (no stored template) is reported as "base"
    base = cfg.model_copy(
        update={
            "out_dir": str(tmp_path / "ev_base"),
            "eval": cfg.eval.model_copy(update={"limit": 1, "probe": 0}),
        }
    )
    got = evaluate(base)
    assert "base" in got and "tuned" not in got and got["base"]["n"] == 1


def test_compare_cli_prints_table_and_report_path(full_run):
    _, _, text = full_run
    assert "base vs tuned" in text and "report.html" in text and "probe: numbers recalled ↑" in text
    assert text.index("On held-out questions") < text.index("token F1 ↑")  # the verdict leads


def test_missing_final_is_a_user_error_with_exit_2(setup, tmp_path, monkeypatch):
    root, model_dir, data = setup
    cfg = cfg_for(tmp_path, model_dir, data)
    with pytest.raises(UserError, match="tunesmith train"):
        compare(cfg)
    from tunesmith import cli

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        f"model: {{name: {model_dir}}}\ndata: {{path: {data}}}\nout_dir: {tmp_path / 'nothing'}\n"
    )
    monkeypatch.setattr(sys, "argv", ["tunesmith", "compare", str(cfg_path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
