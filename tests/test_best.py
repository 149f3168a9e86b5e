"""The best checkpoint (train.select -> best/) and early stopping, on tiny models and hand-made curves."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests import tiny
from tunesmith import cli
from tunesmith.config import UserError
from tunesmith.train import loop as loop_mod
from tunesmith.train import select
from tunesmith.train.loop import train

NEVER_BETTER = "train.early_stop_min_delta=1000"  # after the first eval nothing improves by more than this


cfg_for = tiny.train_config  # a tiny run into <tmp_path>/run (tests/tiny.py)


def rows(run: Path, split: str) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split
    ]


def safetensors_of(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(f))
    return out


# ---- select.py on hand-made sequences


def feed(sel: select.Selection, values: list[float]) -> tuple[select.Selection, list[int], int | None]:
    """Observe values at steps 1, 2, ...: (final selection, steps of a new best, step it would stop at)."""
    bests, stop = [], None
    for step, v in enumerate(values, start=1):
        sel, is_best = select.observe(sel, v, step, step / 10)
        bests += [step] if is_best else []
        if stop is None and select.should_stop(sel):
            stop = step
    return sel, bests, stop


def test_min_mode_keeps_the_lowest_and_patience_counts_evals_since_it():
    sel, bests, stop = feed(select.start("eval_loss", "auto", 0.0, 2), [3.0, 2.5, 2.6, 2.4, 2.45, 2.5, 2.7])
    assert (sel.mode, sel.value, sel.step, sel.epoch) == ("min", 2.4, 4, 0.4)
    assert bests == [1, 2, 4] and stop == 6  # 2.45 and 2.5 after the best at step 4: patience 2 used up


def test_min_delta_decides_both_the_best_and_the_patience():
    sel, bests, stop = feed(select.start("eval_loss", "min", 0.1, 2), [1.0, 0.95, 0.85, 0.8])
    # 0.95 is not 0.1 better than 1.0; 0.85 is (1.0 - 0.15); 0.8 is not 0.1 better than 0.85
    assert bests == [1, 3] and sel.value == 0.85 and sel.stale == 1 and stop is None


def test_direction_auto_and_explicit():
    assert select.direction("eval_loss", "auto") == "min"
    assert select.direction("eval_ppl", "auto") == "min"
    assert select.direction("probe_recall", "auto") == "max"
    assert select.direction("eval_loss", "max") == "max"
    sel, bests, _ = feed(select.start("probe_recall", "auto", 0.0, 0), [0.2, 0.5, 0.4, 0.5])
    assert bests == [1, 2] and sel.value == 0.5 and sel.stale == 2  # equal is not better


def test_nan_is_never_the_best_and_patience_off_never_stops():
    sel, bests, stop = feed(select.start("eval_loss", "auto", 0.0, 0), [float("nan"), 2.0] + [3.0] * 50)
    assert bests == [2] and stop is None and sel.stale == 50


def test_saved_selection_round_trips_unless_its_metric_changed():
    sel, _, _ = feed(select.start("eval_loss", "auto", 0.0, 3), [2.0, 1.0, 1.5])
    saved = json.loads(json.dumps(sel.to_dict()))  # as the checkpoint cursor stores it
    assert select.start("eval_loss", "auto", 0.0, 3, saved) == sel
    assert select.start("eval_loss", "auto", 0.0, 5, saved).patience == 5  # patience may change on a resume
    assert select.start("eval_ppl", "auto", 0.0, 3, saved).value is None  # another metric: counted anew


# ---- training: best/, early stopping, resume


def test_best_holds_the_weights_of_the_lowest_eval_step(tmp_path, model_dir, qa_file, capsys):
    # lr 3e-2 on 36 pairs: the held-out loss falls for ~2 epochs, then rises as the pairs are memorised
    over = [
        "train.lr=3e-2",
        "train.max_steps=24",
        "train.eval_every=2",
        "train.save_every=2",
        "train.keep_last=100",
    ]
    result = train(cfg_for(tmp_path, model_dir, qa_file, *over))
    run = tmp_path / "run"
    evals = rows(run, "eval")
    lowest = min(evals, key=lambda r: r["loss"])
    assert lowest["step"] < evals[-1]["step"], "the constructed curve should rise before the end"
    info = json.loads((run / "best" / "best.json").read_text())
    assert (info["step"], info["metric"], info["mode"]) == (lowest["step"], "eval_loss", "min")
    assert info["value"] == lowest["loss"] and info["epoch"] == lowest["epoch"]
    assert result["best"]["step"] == lowest["step"]
    ckpt = load_file(run / "checkpoints" / f"step-{lowest['step']}" / "trainable.safetensors")
    best = AutoModelForCausalLM.from_pretrained(run / "best").state_dict()  # tied weights come back too
    assert ckpt.keys() <= best.keys() and all(torch.equal(best[k], ckpt[k]) for k in ckpt)
    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert any(not torch.equal(final[k], best[k]) for k in ckpt)  # best/ is not simply the last weights
    # same format as final/: same files besides best.json
    assert {p.name for p in (run / "best").iterdir()} - {"best.json"} == {
        p.name for p in (run / "final").iterdir()
    }
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if "<- best" in line]
    assert len(marked) == 1 and marked[0].split()[0] == str(lowest["step"])
    assert not any(Path(p).name.startswith(".best") for p in os.listdir(run))  # no staging dir left behind


def test_early_stop_at_the_step_patience_implies(tmp_path, model_dir, qa_file):
    # nothing beats the first eval (step 2) by 1000: patience 2 of evals every 2 steps stops after step 6
    over = ["train.max_steps=40", "train.eval_every=2", "train.early_stop_patience=2", NEVER_BETTER]
    result = train(cfg_for(tmp_path, model_dir, qa_file, *over))
    run = tmp_path / "run"
    assert result["steps"] == 6 and [r["step"] for r in rows(run, "eval")] == [2, 4, 6]
    assert [r["step"] for r in rows(run, "train")][-1] == 6
    [event] = rows(run, "event")
    assert (
        event["step"] == 6
        and event["event"] == "early_stop"
        and "train.early_stop_patience=2" in event["reason"]
    )
    segment = json.loads((run / "manifest.json").read_text())["segments"][-1]
    assert segment["status"] == "finished" and segment["ended_at_step"] == 6
    assert segment["early_stop"]["step"] == 6 and segment["best"]["step"] == 2
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 2
    assert (run / "final" / "model.safetensors").is_file()
    assert result["early_stop"] == {"step": 6, "reason": event["reason"]}


def test_resume_keeps_the_best_and_the_patience_count(tmp_path, model_dir, qa_file, monkeypatch):
    common = [
        "train.max_steps=20",
        "train.eval_every=1",
        "train.save_every=1",
        "train.early_stop_patience=3",
        NEVER_BETTER,
    ]
    whole = train(cfg_for(tmp_path / "whole", model_dir, qa_file, *common))
    assert whole["steps"] == 4  # best at step 1, three evals without improving
    calls, real = {"n": 0}, loop_mod.loss_sum

    def sigterm_at_step_2(model, batch, smoothing):  # one micro-batch per step: call n is step n
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, smoothing)

    monkeypatch.setattr(loop_mod, "loss_sum", sigterm_at_step_2)
    with pytest.raises(SystemExit):
        train(cfg_for(tmp_path / "split", model_dir, qa_file, *common))
    monkeypatch.setattr(loop_mod, "loss_sum", real)
    run = tmp_path / "split" / "run"
    cursor = json.loads((run / "checkpoints" / "step-2" / "cursor.json").read_text())
    assert cursor["select"]["step"] == 1 and cursor["select"]["stale"] == 1
    resumed = train(cfg_for(tmp_path / "split", model_dir, qa_file, *common, "train.resume=auto"))
    # without the saved count the resumed run would take step 3 as its first best and stop at step 6
    assert resumed["steps"] == 4 and resumed["best"] == whole["best"]
    a, b = safetensors_of(tmp_path / "whole" / "run" / "best"), safetensors_of(run / "best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_early_stopped_run_trains_no_further(tmp_path, model_dir, qa_file):
    over = ["train.max_steps=40", "train.eval_every=2", "train.save_every=2", "train.early_stop_patience=1"]
    first = train(cfg_for(tmp_path, model_dir, qa_file, *over, NEVER_BETTER))
    again = train(cfg_for(tmp_path, model_dir, qa_file, *over, NEVER_BETTER, "train.resume=auto"))
    assert first["steps"] == again["steps"] == 4 and again["early_stop"]["step"] == 4


def test_evals_and_best_do_not_change_the_training(tmp_path, qa_file):
    # dropout on and a LoRA merge for best/ (it loads the base again): the RNG the steps draw is untouched
    model_dir = tmp_path / "m"
    tiny.gpt_neox(hidden_dropout=0.1, attention_dropout=0.1).save_pretrained(model_dir)
    tiny.tokenizer().save_pretrained(model_dir)
    common = ["train.max_steps=8", "lora.r=4", "lora.dropout=0.1", "lora.merge=true"]
    plain = train(cfg_for(tmp_path / "a", model_dir, qa_file, *common))
    evald = train(
        cfg_for(tmp_path / "b", model_dir, qa_file, *common, "train.eval_every=1", "train.eval_limit=2")
    )
    a, b = safetensors_of(tmp_path / "a" / "run" / "final"), safetensors_of(tmp_path / "b" / "run" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the final eval covers all 4 held-out pairs either way; periodic ones the first 2
    assert evald["eval"]["loss"] == pytest.approx(plain["eval"]["loss"], rel=1e-5)
    evals = rows(tmp_path / "b" / "run", "eval")
    assert [r["examples"] for r in evals] == [2] * 7 + [4] and evals[-1]["eval_limit"]["examples"] == 2
    assert (tmp_path / "b" / "run" / "best" / "config.json").is_file()  # merged, as final/ is


def test_without_periodic_evals_best_is_final(tmp_path, model_dir, qa_file, capsys):
    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=3"))
    run = tmp_path / "run"
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 3
    for f in (run / "final").iterdir():  # hard links: the same files, no second copy
        assert os.path.samefile(f, run / "best" / f.name)
    assert "best/ is final/" in capsys.readouterr().out


def test_best_of_a_lora_run_loads_for_generate_serve_and_compare(tmp_path, model_dir, qa_file):
    from fastapi.testclient import TestClient

    from tunesmith.config import Config, GenerateConfig
    from tunesmith.eval.compare import final_dir
    from tunesmith.model.export import export, load_for_inference
    from tunesmith.serve.app import create_app, load_models

    over = ["train.max_steps=6", "train.eval_every=2", "lora.r=4", NEVER_BETTER]
    train(cfg_for(tmp_path, model_dir, qa_file, *over))
    run = tmp_path / "run"
    assert (run / "best" / "adapter_config.json").is_file()  # an adapter, as final/ is
    assert final_dir(run, "best") == run / "best" and final_dir(run) == run / "final"
    cfg = cfg_for(tmp_path, model_dir, qa_file)
    model, _, template = load_for_inference(str(run / "best"), cfg.model, torch.device("cpu"))
    assert template is not None and not hasattr(model, "peft_config")  # merged for inference
    specs = {"best": str(run / "best"), "final": str(run / "final")}
    scfg = Config(generate=GenerateConfig(max_new_tokens=4))
    with TestClient(create_app(scfg, load_models(scfg, specs))) as c:
        r = c.post(
            "/v1/chat/completions", json={"model": "best", "messages": [{"role": "user", "content": "hi"}]}
        )
    assert r.status_code == 200 and r.json()["model"] == "best"
    exported = export(
        run / "best", tmp_path / "exported", merge=True
    )  # `tunesmith export runs/x/best --merge`
    assert (exported / "config.json").is_file() and (exported / "tunesmith_template.json").is_file()


def test_missing_best_is_a_user_error(tmp_path):
    from tunesmith.eval.compare import final_dir

    with pytest.raises(UserError, match="eval.checkpoint=best but .*best holds no model"):
        final_dir(tmp_path, "best")


def test_unknown_select_metric_is_one_line_exit_2(tmp_path, model_dir, qa_file, monkeypatch, capsys):
    capsys.readouterr()
    argv = ["tunesmith", "train", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text(
        f"model: {{name: {model_dir}}}\ndata: {{path: {qa_file}, test_size: 4}}\n"
        f"out_dir: {tmp_path / 'run'}\ntrain: {{select: probe_recal}}\n"
    )
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: train.select='probe_recal': not a metric the training eval computes (known: eval_loss, "
        "eval_ppl, probe_recall, probe_em)"
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_early_stop_without_a_held_out_split_is_refused(tmp_path, model_dir, qa_file):
    with pytest.raises(UserError, match="early_stop_patience=2: there is no held-out split"):
        train(cfg_for(tmp_path, model_dir, qa_file, "data.test_size=0", "train.early_stop_patience=2"))


def test_probe_recall_selects_and_leaves_the_training_alone(tmp_path, qa_file):
    model_dir = tmp_path / "m"
    tiny.gpt_neox(hidden_dropout=0.1, attention_dropout=0.1).save_pretrained(model_dir)
    tiny.tokenizer().save_pretrained(model_dir)
    common = ["train.max_steps=4", "train.eval_every=2", "eval.max_new_tokens=8", "eval.batch_size=4"]
    plain = tmp_path / "plain"
    train(cfg_for(plain, model_dir, qa_file, *common))
    probed = tmp_path / "probed"
    result = train(cfg_for(probed, model_dir, qa_file, *common, "train.select=probe_recall", "eval.probe=4"))
    evals = rows(probed / "run", "eval")
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["probe_recall"] <= 1 and 0 <= r["probe_em"] <= 1 for r in evals)
    info = json.loads((probed / "run" / "best" / "best.json").read_text())
    first_highest = max(evals, key=lambda r: r["probe_recall"])  # max() keeps the first of equals, as select
    assert (info["metric"], info["mode"], info["step"]) == ("probe_recall", "max", first_highest["step"])
    assert info["value"] == first_highest["probe_recall"] == result["best"]["value"]
    assert "probe_recall" not in rows(plain / "run", "eval")[0]  # off unless train.select asks for it
    a, b = safetensors_of(plain / "run" / "final"), safetensors_of(probed / "run" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_probe_selection_without_probe_questions_is_refused(tmp_path, model_dir, qa_file):
    with pytest.raises(UserError, match="train.select=probe_em: the probe asks eval.probe trained questions"):
        train(cfg_for(tmp_path, model_dir, qa_file, "train.select=probe_em", "eval.probe=0"))


def test_a_best_kept_after_the_resumed_step_moves_aside(tmp_path):
    from tunesmith.train import checkpoint

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text(json.dumps({"step": 6}))
    assert checkpoint.rewind_best(tmp_path, 6) is None and (tmp_path / "best").is_dir()  # reached: kept
    assert checkpoint.rewind_best(tmp_path, 4) == tmp_path / "best.rewound"
    assert not (tmp_path / "best").exists() and (tmp_path / "best.rewound" / "best.json").is_file()
