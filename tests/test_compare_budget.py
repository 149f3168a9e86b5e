"""eval.time_budget: compare's answering in chunks across every system, stopped before the budget.

The budget logic runs on a hand-driven clock (no timed assertions); the end-to-end runs use budgets that
cannot be ambiguous on any machine: 1 ms (only the first chunk, which is always answered) and a day (all).
"""

import json

import pytest
from rich.console import Console

from tests import tiny
from tests.test_compare import cfg_for, read_jsonl
from tunesmith.eval.answering import merged, plan_chunks, run_chunks
from tunesmith.eval.compare import compare, compare_cli
from tunesmith.eval.systems import Answers
from tunesmith.generate import Completion
from tunesmith.train.loop import train

# ---- the chunks and the loop, on a hand-driven clock


def sizes(chunks):
    return [(len(c.test), len(c.probe)) for c in chunks]


def test_chunks_ask_held_out_first_and_both_sets_from_the_first_chunk():
    # 16 held-out + 12 probe in chunks of 16: after chunk 1, ceil(16 x 16/28) = 10 held-out; then the rest
    assert sizes(plan_chunks(16, 12, 16)) == [(10, 6), (6, 6)]
    chunks = plan_chunks(16, 12, 16)
    assert (chunks[0].test, chunks[0].probe, chunks[1].test, chunks[1].probe) == (
        range(0, 10),
        range(0, 6),
        range(10, 16),
        range(6, 12),
    )
    # one probe question among 100 held-out ones is still asked in the first chunk
    assert sizes(plan_chunks(100, 1, 16))[0] == (15, 1)
    assert sizes(plan_chunks(3, 0, 4)) == [(3, 0)]
    assert sizes(plan_chunks(0, 5, 2)) == [(0, 2), (0, 2), (0, 1)]
    assert plan_chunks(0, 0, 4) == []


class Clock:
    """Seconds that move only when a fake system answers (or by hand)."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_fake(budget_s: float):
    # 8 held-out + 4 probe in chunks of 4: (3, 1), (3, 1), (2, 2). System a takes 1 s a question, b 3 s: a
    # chunk costs 4 + 12 = 16 s. 10 s spent before answering; 5 s kept for scoring and the report
    clock, tails = Clock(10.0), []
    rate = {"a": 1.0, "b": 3.0}

    def answer(name, chunk):
        clock.now += rate[name] * chunk.size
        return (name, chunk)

    def tail_s(got, questions):
        tails.append((len(got["a"]), questions))
        return 5.0

    plan = plan_chunks(8, 4, 4)
    assert sizes(plan) == [(3, 1), (3, 1), (2, 2)]
    got, rec = run_chunks(plan, ["a", "b"], answer, clock, budget_s, tail_s)
    return plan, got, rec, tails


def test_answering_stops_when_the_next_chunk_would_pass_the_budget():
    # chunk 1 ends at 26 s; chunk 2 predicted 16 s + 5 s tail: 47 <= 50, go (ends at 42); chunk 3: 63 > 50
    plan, got, rec, tails = run_fake(50.0)
    assert [c for _, c in got["a"]] == [c for _, c in got["b"]] == plan[:2]  # every system, same chunks
    assert tails == [(1, 8), (2, 12)]  # the tail for the questions answered once that chunk is done
    assert (rec.done, rec.seconds, rec.next_s, rec.tail_s) == (2, 42.0, 16.0, 5.0)
    assert rec.counts() == (6, 8, 2, 4)
    assert rec.per_question_s == {"a": 1.0, "b": 3.0}
    out = rec.to_dict()
    assert (out["test"], out["test_of"], out["probe"], out["probe_of"], out["chunks"]) == (6, 8, 2, 4, 2)
    assert out["text"] == (
        "answered 6 of 8 held-out and 2 of 4 probe questions in the budget (50s): chunk 3 of 3 was predicted "
        "to take 16 s more, 5 s kept for scoring and the report, at 42 s"
    )


def test_a_chunk_that_ends_exactly_at_the_budget_is_answered_and_the_first_always_is():
    _, _, rec, _ = run_fake(63.0)  # 42 + 16 + 5 = 63: fits
    assert rec.done == 3 and rec.next_s is None
    assert rec.to_dict()["text"] == "answered 8 of 8 held-out and 4 of 4 probe questions in the budget (63s)"
    _, _, rec, tails = run_fake(1.0)  # spent already: the first chunk is answered, nothing after it
    assert (rec.done, rec.counts(), tails) == (1, (3, 8, 1, 4), [(1, 8)])


def test_merged_chunks_keep_held_out_then_probe_order_and_weigh_the_loss_by_tokens():
    def c(text):
        return Completion([1], text, "stop", 3)

    one = Answers(
        [c("t0"), c("t1")],
        [c("p0")],
        {"loss": 1.0, "perplexity": 2.718, "tokens": 10},
        2.0,
        latencies=[1.0, 1.0, 1.0],
        prompt_tokens=[5, 6, 7],
        completion_tokens=[1, 2, 3],
        peak_memory_bytes=100,
        dropped_shots=1,
    )
    two = Answers(
        [c("t2")],
        [c("p1")],
        {"loss": 2.0, "perplexity": 7.389, "tokens": 30},
        4.0,
        latencies=[2.0, 2.0],
        prompt_tokens=[8, 9],
        completion_tokens=[4, 5],
        peak_memory_bytes=300,
    )
    m = merged([one, two])
    assert [x.text for x in m.test] == ["t0", "t1", "t2"] and [x.text for x in m.probe] == ["p0", "p1"]
    assert m.prompt_tokens == [5, 6, 8, 7, 9] and m.completion_tokens == [1, 2, 4, 3, 5]
    assert m.latencies == [1.0, 1.0, 2.0, 1.0, 2.0]
    assert m.loss["loss"] == pytest.approx((1.0 * 10 + 2.0 * 30) / 40) and m.loss["tokens"] == 40
    assert m.loss["perplexity"] == pytest.approx(2.718281828**1.75)
    assert (m.seconds, m.peak_memory_bytes, m.dropped_shots) == (6.0, 300, 1)


# ---- end to end on a tiny LoRA run: 3 held-out + 3 probe questions, chunks of 4: (2, 2) then (1, 1)

SYSTEMS = "eval.systems=[base,tuned,base+fewshot]"
COMPARED = ("token_f1", "rouge_l", "exact_match", "loss", "perplexity", "probe_token_f1", "probe_exact_match")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_budget")
    model_dir, data = tiny.save_model_dir(root / "tiny-neox"), tiny.write_qa(root / "qa.jsonl")
    over = ["train.max_steps=8", "train.lr=1e-2", "lora.r=8", "lora.dropout=0.0", SYSTEMS]
    cfg = cfg_for(root, model_dir, data, *over)
    train(cfg)
    return root, model_dir, data, over


@pytest.mark.slow  # ~10 s on 2 idle cores (two compares of 3 systems)
def test_a_spent_budget_answers_the_first_chunk_for_every_system(lora_run):
    root, model_dir, data, over = lora_run
    cfg = cfg_for(root, model_dir, data, *over, "eval.time_budget=0.001")
    console = Console(record=True, width=200)
    metrics = compare_cli(cfg, console)
    out = root / "run" / "eval"
    line = "answered 2 of 3 held-out and 2 of 3 probe questions in the budget (0.001s)"
    assert metrics["answered"]["text"].startswith(line + ": chunk 2 of 2 was predicted")
    assert json.loads((out / "metrics.json").read_text())["answered"]["test"] == 2
    assert line in (out / "report.html").read_text() and line in console.export_text()
    rows, probe_rows = read_jsonl(out / "predictions.jsonl"), read_jsonl(out / "probe_predictions.jsonl")
    assert len(rows) == 2 and len(probe_rows) == 2
    for side in ("base", "tuned", "base+fewshot"):
        assert metrics[side]["n"] == 2 and metrics[side]["probe_n"] == 2
    # the first chunk is exactly the questions of eval.limit=2 and eval.probe=2 in one batch: the same
    # answers, and every metric over those questions only (the loss over their 2 samples)
    plain = compare(cfg_for(root, model_dir, data, *over, "eval.limit=2", "eval.probe=2"))
    assert "answered" not in plain
    plain_rows = out / "predictions.jsonl"  # now the unbudgeted run's
    for side in ("base", "tuned", "base+fewshot"):
        assert [r[side]["answer"] for r in rows] == [r[side]["answer"] for r in read_jsonl(plain_rows)]
        for name in COMPARED:
            if name in plain[side]:
                assert metrics[side][name] == pytest.approx(plain[side][name]), (side, name)
    assert "loss" in plain["tuned"] and "loss" in metrics["base"]


@pytest.mark.slow  # ~10 s on 2 idle cores (two compares of 3 systems)
def test_a_generous_budget_answers_everything_and_no_budget_changes_nothing(lora_run):
    root, model_dir, data, over = lora_run
    budgeted = compare(cfg_for(root, model_dir, data, *over, "eval.time_budget=86400"))
    assert budgeted["answered"]["text"] == (
        "answered 3 of 3 held-out and 3 of 3 probe questions in the budget (86400s)"
    )
    assert budgeted["answered"]["chunks"] == 2 and budgeted["answered"]["next_chunk_s"] is None
    plain = compare(cfg_for(root, model_dir, data, *over))
    out = root / "run" / "eval"
    assert "answered" not in plain and "answered" not in json.loads((out / "metrics.json").read_text())
    assert "in the budget" not in (out / "report.html").read_text()
    for side in ("base", "tuned", "base+fewshot"):
        assert plain[side]["n"] == budgeted[side]["n"] == 3
        assert plain[side]["probe_n"] == budgeted[side]["probe_n"] == 3
        # the same questions; the loss pass (not generation: its batches differ) is the same number
        if "loss" in plain[side]:
            assert budgeted[side]["loss"] == pytest.approx(plain[side]["loss"])
