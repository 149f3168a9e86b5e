"""train.time_budget: the pure sizing (plan/budget.py), and on tiny models the warm-up that leaves training
untouched, a re-planned schedule, data.limit=auto seen by every later stage, resume, the hard stop and
eval_every=epoch.

The tiny data (tests/tiny.py: 40 QA pairs, 4 held out) renders to ~42 tokens a pair: with data.max_length=64
each packed row holds one pair, so 36 training pairs at batch_size=4 are 9 micro-batches an epoch. Speeds
are set by hand (budget.measure replaced) wherever a test counts steps; the clock (budget.elapsed) where
it stops a run, so nothing here depends on how fast this machine is.
"""

import json

import pytest
import torch

from tests.test_train import cfg_for, weights
from tunesmith.config import UserError
from tunesmith.data.pack import epoch_batches
from tunesmith.plan.budget import (
    Costs,
    Speeds,
    epoch_eval_period,
    fit_examples,
    format_duration,
    predicted_seconds,
    size_steps,
)
from tunesmith.runtime import Dist
from tunesmith.train import budget
from tunesmith.train.loop import train
from tunesmith.train.optim import lr_factor

# ---- the pure sizing


def costs(**over) -> Costs:
    """budget 100 s, 10 s spent, 100 tokens a step, evals of 1000 / 2000 tokens, 3 s reserved."""
    base = dict(
        budget_s=100.0,
        spent_s=10.0,
        tokens_per_step=100.0,
        eval_tokens=1000,
        final_eval_tokens=2000,
        save_every=0,
        save_s=0.0,
        reserve_s=3.0,
    )
    return Costs(**{**base, **over})


SPEEDS = Speeds(train_s_per_token=0.01, eval_s_per_token=0.001, source="measured")  # 1 s a step, 1 s an eval


def test_format_duration():
    assert [format_duration(s) for s in (480, 45.2, 90, 5400)] == ["8m0s", "45s", "1m30s", "1h30m0s"]


def test_predicted_seconds_by_part():
    # 20 steps, eval every 10: one periodic eval (at 10; the one at 20 is the final eval)
    p = predicted_seconds(20, 10, SPEEDS, costs())
    assert (p["step_s"], p["train_s"], p["evals_s"], p["final_eval_s"], p["saves_s"]) == pytest.approx(
        (1.0, 20.0, 1.0, 2.0, 3.0)
    )
    assert p["end_s"] == pytest.approx(10 + 20 + 1 + 2 + 3)
    # checkpoints every 5 steps: at 5, 10, 15 (the last one is in the reserve), 0.5 s each
    assert predicted_seconds(20, 10, SPEEDS, costs(save_every=5, save_s=0.5))["saves_s"] == pytest.approx(4.5)


def test_fewer_steps_fit_and_the_run_is_replanned():
    # end(s) = 10 spent + s + (s - 1) // 10 evals + 2 final eval + 3 reserve <= 100: s = 78 (78 + 7 = 85)
    s = size_steps(200, 10, 5.0, SPEEDS, costs())
    assert (s.steps, s.configured_steps, s.eval_every) == (78, 200, 10)
    assert s.end_s == pytest.approx(10 + 78 + 7 + 2 + 3)
    assert s.epochs == pytest.approx(5.0 * 78 / 200)
    assert "78 of the 200 configured steps fit: the run is re-planned to 78 steps" in s.why


def test_all_configured_steps_fit():
    s = size_steps(50, 10, 2.0, SPEEDS, costs())
    assert (s.steps, s.epochs) == (50, 2.0)
    assert "all 50 configured steps fit" in s.why and "predicted end at 1m9s" in s.why  # 10+50+4+2+3


def test_a_best_save_is_counted_at_each_periodic_eval(monkeypatch):
    # 10 steps, eval every 3: periodic evals at 3, 6, 9 (10's is the final), each may write best/ (2 s)
    p = predicted_seconds(10, 3, SPEEDS, costs(best_s=2.0))
    assert p["saves_s"] == pytest.approx(3 * 2.0 + 3.0)
    assert p["end_s"] == pytest.approx(10 + 10 + 3 + 2 + 9)
    # budget 40: end(s) = 15 + s + (s - 1) // 3 evals of 1 s [+ 2 s of best/ each]: 19 steps fit without
    # the saves (15 + 19 + 6 = 40), 13 with them (15 + 13 + 4 x 3 = 40; 14: 15 + 14 + 12 = 41)
    assert size_steps(100, 3, 1.0, SPEEDS, costs(budget_s=40.0)).steps == 19
    s = size_steps(100, 3, 1.0, SPEEDS, costs(budget_s=40.0, best_s=2.0))
    assert s.steps == 13 and "best/ (2 s at each periodic eval)" in s.why
    # the hard stop: at 4.5 s of 10, a step of 1 s with its eval (1 s) and best/ (2 s), the final eval (1 s)
    # and the final save (1 s) need 6 s: stop; a step without an eval needs 3 s: go on
    g = budget.Guard(10.0, 0.0, eval_s=1.0, final_eval_s=1.0, reserve_s=1.0, planned=5, best_s=2.0)
    monkeypatch.setattr(budget, "elapsed", lambda t0: 4.5)
    d = Dist()
    assert budget.stop_now(g, 1.0, 4, 2, d) and not budget.stop_now(g, 1.0, 3, 2, d)
    # what one best/ save costs: what final/ writes (the adapter's fp32 weights, or the merged model) + 1 s
    assert budget.best_seconds(50_000_000, 10**9, False, True) == pytest.approx(2.0)  # 200 MB at 200 MB/s
    assert budget.best_seconds(50_000_000, 4 * 10**8, True, True) == pytest.approx(3.0)
    assert budget.best_seconds(50_000_000, 10**9, False, False) == 0.0  # no held-out data: no evals


def test_at_least_one_step_even_when_none_fits():
    s = size_steps(50, 0, 1.0, SPEEDS, costs(budget_s=5.0))
    assert s.steps == 1 and "even one step does not fit" in s.why


def test_auto_takes_the_largest_n_that_fits():
    # 10 tokens a pair, 40 a step at 0.1 s a token = 4 s a step; 2 epochs of n pairs = ceil(n / 2) steps;
    # budget 60 s, nothing else costs: ceil(n / 2) <= 15, so n = 30
    c = costs(
        budget_s=60.0, spent_s=0.0, tokens_per_step=40.0, eval_tokens=0, final_eval_tokens=0, reserve_s=0
    )
    fast = Speeds(0.1, 0.0, "measured")
    assert fit_examples([10] * 100, 2.0, 0, fast, c) == 30
    assert fit_examples([10] * 20, 2.0, 0, fast, c) == 20  # the whole pool fits: all of it
    assert fit_examples([10] * 100, 2.0, 0, fast, costs(budget_s=1.0)) == 1  # nothing fits: still one
    # eval_every=epoch adds an eval per pass before the last: 2 passes, one periodic eval of 5 s (within
    # 15% of 60 s, so not thinned). n = 27: 270 tokens are 7 steps a pass of 270/7 tokens (time goes by
    # tokens), 14 x 3.86 + 5 = 59; n = 28: 14 x 4 + 5 = 61; without evals n would be 30
    c_eval = costs(budget_s=60.0, spent_s=0.0, tokens_per_step=40.0, eval_tokens=50, final_eval_tokens=0)
    c_eval.reserve_s = 0.0
    assert fit_examples([10] * 100, 2.0, "epoch", Speeds(0.1, 0.1, "measured"), c_eval) == 27


def test_epoch_evals_thin_out_when_they_would_eat_the_budget():
    # 2-step passes, 20 steps, 240 s: 15% is 36 s. An eval each pass: 9 periodic x 6 s = 54 s, too much;
    # every 2nd pass (4 steps): 4 x 6 = 24 s. Cheap evals (1 s): every pass (9 s)
    assert epoch_eval_period(2, 20, 6.0, 240.0) == 4
    assert epoch_eval_period(2, 20, 1.0, 240.0) == 2
    assert epoch_eval_period(2, 20, 1e9, 240.0) == 20  # never beyond the run: only the final eval is left


def test_auto_counts_a_few_pairs_as_a_part_full_step():
    # 100-token steps, 10-token pairs at 0.1 s a token: a pass over n <= 10 pairs is one step of 10n tokens
    # (n s), not a full step (10 s). 10 epochs; evals of 5 s thinned to every 3rd pass (3 x 5 s = 15% of
    # 100 s): 10n + 15 <= 100, so n = 8 (a full step per pass would fit none: 100 + 15 > 100)
    c = costs(budget_s=100.0, spent_s=0.0, tokens_per_step=100.0, eval_tokens=10, final_eval_tokens=0)
    c.reserve_s = 0.0
    assert fit_examples([10] * 50, 10.0, "epoch", Speeds(0.1, 0.5, "measured"), c) == 8


# ---- on tiny models


def fixed_speed(step_s: float, tokens_per_step: float = 1504 / 9):
    """A measure() that reports `step_s` seconds a step (36 pairs of 1504 real tokens are 9 steps an
    epoch) and free evals."""

    def measure(*args, **kwargs):
        return Speeds(step_s / tokens_per_step, 0.0, "measured")

    return measure


def stop_after(calls: int):
    """An elapsed() that reads 0 s for `calls` steps, then far past any budget: the run stops right after
    step `calls + 1`."""
    seen = []

    def elapsed(t0):
        seen.append(t0)
        return 0.0 if len(seen) <= calls else 1e9

    return elapsed


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [["lora.r=4", "lora.dropout=0.1"], []], ids=["lora-dropout", "full"])
def test_warmup_leaves_training_bit_identical(tmp_path, model_dir, qa_file, lora):
    # the real warm-up (forward/backward, an lr=0 optimizer step, an eval forward; LoRA dropout draws from the
    # RNG): with everything restored, the budgeted run trains the same weights as the plain one
    common = ["train.max_steps=6", "train.precision=fp32", *lora]
    plain = train(cfg_for(tmp_path / "a", model_dir, qa_file, *common))
    timed = train(cfg_for(tmp_path / "b", model_dir, qa_file, *common, "train.time_budget=1h"))
    assert plain["steps"] == timed["steps"] == 6
    assert json.loads((tmp_path / "b" / "run" / "budget.json").read_text())["steps"] == 6
    a, b = (weights(tmp_path / x / "run" / "final") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_budget_replans_fewer_steps(tmp_path, model_dir, qa_file, monkeypatch, capsys):
    # 100 s a step, budget 450 s: 4 steps fit (10 s spent or so, 2 s reserved) of the 27 of 3 epochs
    monkeypatch.setattr(budget, "measure", fixed_speed(100.0))
    over = ["train.epochs=3", "train.time_budget=450", "train.scheduler=cosine", "train.warmup_ratio=0"]
    result = train(cfg_for(tmp_path, model_dir, qa_file, *over))
    run = tmp_path / "run"
    record = json.loads((run / "budget.json").read_text())
    assert (result["steps"], record["steps"], record["configured_steps"]) == (4, 4, 27)
    # the cosine is planned over the 4 steps, so it ends: the last step's lr is 3e-3 x factor(3 of 4)
    lrs = [r["lr"] for r in rows(run) if r["split"] == "train"]
    assert lrs == pytest.approx([3e-3 * lr_factor(s, 4, 0, "cosine") for s in range(4)])
    out = capsys.readouterr().out
    assert "time budget 7m30s: 4 steps" in out and "re-planned to 4 steps" in out
    plan = json.loads((run / "plan.json").read_text())
    assert plan["run"]["steps"] == 4 and plan["budget"]["steps"] == 4
    assert plan["budget"]["measured"]["stopped_at_budget"] is False
    assert plan["budget"]["measured"]["fraction_of_plan"] == 1.0


def test_auto_limit_is_what_every_later_stage_sees(tmp_path, model_dir, qa_file, monkeypatch):
    from tunesmith.data.inspect import inspect_data
    from tunesmith.data.pipeline import build
    from tunesmith.eval.questions import eval_sets
    from tunesmith.model.load import load_tokenizer
    from tunesmith.retrieve.rag import train_passages

    over = ["data.limit=auto", "train.time_budget=450", "train.epochs=1", "eval.probe=100"]
    cfg = cfg_for(tmp_path, model_dir, qa_file, *over)
    tok = load_tokenizer(cfg.model)
    with pytest.raises(UserError, match="train first"):
        build(cfg, tok, cfg.out_dir)  # eval / serve before any sized run
    pool = build(cfg, tok, cfg.out_dir, auto="pool").train
    # 100 s per 1504/9 real tokens, free evals, 450 s: time goes by the pairs' tokens (a part-full step
    # costs its share), so n is the last pair whose running token count still fits after what was spent
    monkeypatch.setattr(budget, "measure", fixed_speed(100.0))
    train(cfg)
    cum = [sum(len(s["input_ids"]) for s in pool[:n]) for n in range(1, len(pool) + 1)]
    run = tmp_path / "run"
    rec = json.loads((run / "budget.json").read_text())
    n, fixed_s, s_per_token = rec["examples"], rec["spent_s"] + rec["saves_s"], 100.0 / (1504 / 9)
    assert 1 <= n < len(pool)
    assert fixed_s + cum[n - 1] * s_per_token <= 450 < fixed_s + cum[n] * s_per_token
    data = build(cfg, tok, run)  # what compare builds
    assert len(data.train_examples) == len(data.train) == n
    assert [e.where for e in data.train_examples] == [s["where"] for s in pool[:n]]
    _, probe = eval_sets(cfg, data, data.template, tok)
    assert len(probe.questions) == n  # probe questions come from the trained pairs only
    assert len(train_passages(cfg, tok, "eval.rag")) == n  # the RAG corpus 'train' too (serve.rag alike)
    assert inspect_data(cfg, tok, run)["counts"]["train"] == n
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train_examples"] == n


def test_budget_stop_writes_checkpoint_final_and_line(tmp_path, model_dir, qa_file, monkeypatch, capsys):
    monkeypatch.setattr(budget, "measure", fixed_speed(0.001))  # the plan: all 18 steps of 2 epochs
    monkeypatch.setattr(budget, "elapsed", stop_after(2))  # ... but the clock runs out after step 3
    over = ["train.epochs=2", "train.time_budget=8m", "train.save_every=0", "train.eval_limit=2"]
    result = train(cfg_for(tmp_path, model_dir, qa_file, *over))
    run = tmp_path / "run"
    assert result["steps"] == 3 and result["time_budget"] == {"step": 3, "planned": 18}
    assert (run / "checkpoints" / "step-3").is_dir() and (run / "final").is_dir()
    evals = [r for r in rows(run) if r["split"] == "eval"]
    assert [(e["step"], e["examples"], e["eval_limit"]["examples"]) for e in evals] == [(3, 4, 2)]
    assert {"step": 3, "split": "event", "event": "time_budget", "planned": 18} in rows(run)
    assert (
        "stopped at the time budget (8m0s) at step 3 of 18 planned (17% of the plan); checkpoint "
        f"{run / 'checkpoints' / 'step-3'}, resume with train.resume=auto to finish"
    ) in capsys.readouterr().out
    segment = json.loads((run / "manifest.json").read_text())["segments"][-1]
    assert segment["status"] == "finished" and segment["time_budget"] == {"step": 3, "planned": 18}
    measured = json.loads((run / "plan.json").read_text())["budget"]["measured"]
    assert measured["stopped_at_budget"] is True and measured["fraction_of_plan"] == pytest.approx(3 / 18)


def test_resume_reuses_the_sizing(tmp_path, model_dir, qa_file, monkeypatch):
    over = ["data.limit=auto", "train.time_budget=450", "train.epochs=1", "train.save_every=1"]
    monkeypatch.setattr(budget, "measure", fixed_speed(100.0))
    monkeypatch.setattr(budget, "elapsed", stop_after(1))
    first = train(cfg_for(tmp_path, model_dir, qa_file, *over))
    run = tmp_path / "run"
    record = json.loads((run / "budget.json").read_text())
    assert first["steps"] == 2 < record["steps"]

    def no_warmup(*args, **kwargs):
        raise AssertionError("a resume must reuse the recorded sizing, not warm up again")

    monkeypatch.setattr(budget, "measure", no_warmup)
    monkeypatch.setattr(budget, "elapsed", lambda t0: 0.0)
    # another budget is no change of the training (train.time_budget is free on a resume)
    again = [*over[:1], *over[2:], "train.time_budget=1h", "train.resume=auto"]
    second = train(cfg_for(tmp_path, model_dir, qa_file, *again))
    assert second["steps"] == record["steps"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train_examples"] == record["examples"] and len(manifest["segments"]) == 2
    assert json.loads((run / "budget.json").read_text()) == record


def test_eval_every_epoch(tmp_path, model_dir, qa_file):
    # 9 micro-batches an epoch, grad_accum 3: 3 steps an epoch, 2 epochs = 6 steps, evals at 3 and 6
    over = ["train.epochs=2", "train.grad_accum=3", "train.eval_every=epoch"]
    train(cfg_for(tmp_path, model_dir, qa_file, *over))
    assert [r["step"] for r in rows(tmp_path / "run") if r["split"] == "eval"] == [3, 6]


def test_streaming_has_no_epochs_or_pairs_to_count(tmp_path, qa_file):
    from tunesmith.config import load_config
    from tunesmith.train.preflight import Report, check_epochs

    over = [f"data.path={qa_file}", "data.streaming=true", "train.max_steps=5", "train.time_budget=1m"]
    report = Report()
    check_epochs(load_config(None, [*over, "train.eval_every=epoch", "data.limit=auto"]), report)
    assert [e.split(":")[0] for e in report.errors] == ["train.eval_every=epoch", "data.limit=auto"]
    report = Report()
    check_epochs(load_config(None, [*over, "train.eval_every=5"]), report)
    assert report.errors == []


def test_plan_sizes_from_the_planner(tmp_path, model_dir, qa_file):
    from tunesmith.data.pipeline import build
    from tunesmith.model.load import load_tokenizer
    from tunesmith.plan.budget import sizing_lines
    from tunesmith.train.budget import plan_with_budget

    cfg = cfg_for(tmp_path, model_dir, qa_file, "train.epochs=3", "train.time_budget=1h")
    plan = plan_with_budget(cfg, build(cfg, load_tokenizer(cfg.model), None, auto="pool"))
    sized = plan["budget"]
    assert sized["source"] == "planner" and sized["configured_steps"] == 27  # 3 epochs of 9 steps
    assert plan["run"]["steps"] == sized["steps"] <= 27
    lines = sizing_lines(sized)
    assert lines[0].startswith("time budget 1h0m0s: ") and "train measures on the spot" in lines[1]


def test_speed_per_real_token_scales_with_how_full_the_rows_are():
    # max_length 10, batch 2 rows: pairs of 9 and 2 tokens cannot share a row (11 > 10), so one batch of two
    # rows 9 wide computes 18 positions for 11 real tokens (fill 11/18). Measured at 1 s a real token over
    # rows half full (fill 0.5), they cost 0.5 / (11/18) = 9/11 s a real token.
    def packed(lengths):
        return epoch_batches(lengths, 2, 10, True, 42, 0)

    got = budget.at_fill(Speeds(1.0, 0.0, "measured", 0.5), [9, 2], packed([9, 2]))
    assert got.fill == pytest.approx(11 / 18)
    assert got.train_s_per_token == pytest.approx(9 / 11)
    # two pairs of 5 share a row of 10: full rows, half the time per real token of the half-full warm-up
    full = budget.at_fill(Speeds(1.0, 0.0, "measured", 0.5), [5, 5], packed([5, 5]))
    assert full.train_s_per_token == pytest.approx(0.5)
    # speeds without a measured fill (the planner's) are taken as they are
    assert budget.at_fill(Speeds(1.0, 0.0, "planner"), [9, 2], packed([9, 2])).train_s_per_token == 1.0
