"""A run dir holds one run: a resume after the data, template, tokenizer or an optimisation setting changed is
refused (or allowed explicitly and recorded), and a fresh run never buries a finished one."""

import json
import re

import pytest

from tests import tiny
from tests.test_train import cfg_for
from tunesmith.config import UserError
from tunesmith.train import checkpoint
from tunesmith.train.loop import train
from tunesmith.train.record import RESUME_FREE, fingerprint

FIRST = ("train.max_steps=2", "train.save_every=1", "train.keep_last=2")


def manifest(run):
    return json.loads((run / "manifest.json").read_text())


def refused(tmp_path, model_dir, qa_file, *over) -> str:
    """Train FIRST, then resume with `over`: the UserError's message; the run dir is left as it was."""
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, *FIRST))
    before = {
        p.name: p.read_bytes() for p in (run / "config.yaml", run / "manifest.json", run / "metrics.jsonl")
    }
    with pytest.raises(UserError) as e:
        train(cfg_for(tmp_path, model_dir, qa_file, *FIRST, "train.resume=auto", *over))
    after = {
        p.name: p.read_bytes() for p in (run / "config.yaml", run / "manifest.json", run / "metrics.jsonl")
    }
    assert after == before  # a refused resume writes nothing
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{run}: cannot resume: ")
    assert msg.endswith("(set train.resume_changed=allow to continue anyway; the manifest records it)")
    return msg


def test_lr_change_refuses_naming_old_and_new(tmp_path, model_dir, qa_file):
    msg = refused(tmp_path, model_dir, qa_file, "train.lr=1e-3")
    assert "cannot resume: train.lr 0.003 -> 0.001 (" in msg  # only the key that changed


def test_data_change_refuses_naming_both_hashes(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, *FIRST))
    old = manifest(run)["data_hash"]
    tiny.write_qa(qa_file, seed=1)  # same rows, other answers
    with pytest.raises(UserError) as e:
        train(cfg_for(tmp_path, model_dir, qa_file, *FIRST, "train.resume=auto"))
    m = re.search(r"cannot resume: data_hash (\w{8})\.\.\. -> (\w{8})\.\.\. \(", str(e.value))
    assert m and m[1] == old[:8] and m[2] != m[1]


def test_template_change_refuses(tmp_path, model_dir, qa_file):
    msg = refused(tmp_path, model_dir, qa_file, "data.template=chat")
    assert re.search(r"template_hash \w{8}\.\.\. -> \w{8}\.\.\., data.template qa -> chat \(", msg)


def test_tokenizer_change_refuses(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, *FIRST))
    tok = tiny.tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    tok.save_pretrained(model_dir)  # same model dir, same model.name: only the tokenizer differs
    with pytest.raises(UserError, match=r"cannot resume: tokenizer_hash \w{8}\.\.\. -> \w{8}\.\.\. \("):
        train(cfg_for(tmp_path, model_dir, qa_file, *FIRST, "train.resume=auto"))
    assert [s["status"] for s in manifest(run)["segments"]] == ["finished"]


def test_allowed_change_continues_and_is_recorded(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, *FIRST))
    result = train(
        cfg_for(
            tmp_path,
            model_dir,
            qa_file,
            *FIRST,
            "train.resume=auto",
            "train.lr=1e-3",
            "train.max_steps=4",
            "train.resume_changed=allow",
        )
    )
    assert result["steps"] == 4
    first, second = manifest(run)["segments"]
    assert (first["started_at_step"], first["ended_at_step"], first["status"], first["changed"]) == (
        0,
        2,
        "finished",
        [],
    )
    assert (second["started_at_step"], second["ended_at_step"], second["status"]) == (2, 4, "finished")
    assert second["resumed_from"].endswith("step-2") and second["allowed"] is True
    assert second["changed"] == [
        {"key": "train.lr", "old": 0.003, "new": 0.001},
        {"key": "train.max_steps", "old": 2, "new": 4},
    ]
    assert {"versions", "started", "ended", "git_rev"} <= second.keys()
    assert manifest(run)["fingerprint"]["train.lr"] == 0.001  # the next resume compares with this segment
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]


def test_logging_and_saving_keys_may_change_on_resume(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=2", "train.save_every=1"))
    train(
        cfg_for(
            tmp_path,
            model_dir,
            qa_file,
            "train.max_steps=2",
            "train.resume=auto",
            "train.save_every=2",
            "train.keep_last=1",
            "train.log_every=5",
            "train.eval_every=1",
            "model.attn_implementation=eager",
        )
    )
    assert [s["changed"] for s in manifest(run)["segments"]] == [[], []]


def test_fingerprint_compares_what_changes_the_optimisation():
    from tunesmith.config import Config

    fp = fingerprint(
        Config().model_dump(mode="json"), 1, {"data_hash": "a", "template_hash": "b", "tokenizer_hash": "c"}
    )
    for key in (
        "train.lr",
        "train.betas",
        "train.eps",
        "train.weight_decay",
        "train.scheduler",
        "train.warmup_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.epochs",
        "train.max_steps",
        "train.label_smoothing",
        "train.max_grad_norm",
        "train.precision",
        "train.seed",
        "data.max_length",
        "data.packing",
        "data.truncation",
        "model.name",
        "model.dtype",
        "lora",
        "world_size",
        "data_hash",
    ):
        assert key in fp, key
    assert not RESUME_FREE & fp.keys()
    assert not any(k.startswith(("eval.", "serve.", "generate.", "synth.", "plan.")) for k in fp)


def test_run_of_an_older_tunesmith_is_compared_through_its_config(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, *FIRST))
    old = manifest(run)  # as written before fingerprints and segments existed
    legacy = {
        k: old[k]
        for k in ("model", "lora", "seed", "data_hash", "template_hash", "tokenizer_hash", "versions")
    }
    (run / "manifest.json").write_text(json.dumps(legacy))
    for ckpt in checkpoint.checkpoints(run):
        (ckpt / "fingerprint.json").unlink()
        (ckpt / "checksums.json").unlink()
    with pytest.raises(UserError, match=r"cannot resume: train.lr 0.003 -> 0.001 \("):
        train(cfg_for(tmp_path, model_dir, qa_file, *FIRST, "train.resume=auto", "train.lr=1e-3"))
    train(cfg_for(tmp_path, model_dir, qa_file, *FIRST, "train.resume=auto"))
    segments = manifest(run)["segments"]
    assert [s["status"] for s in segments] == ["unknown (recorded before segments)", "finished"]
    assert segments[0]["versions"] == old["versions"]


def test_fresh_run_over_a_finished_run_of_another_config_refuses(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=1"))
    old_final = (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(UserError) as e:
        train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=1", "train.lr=1e-3"))
    msg = str(e.value)
    assert msg.startswith(
        f"{run}: holds a finished run of another config: train.lr 0.003 -> 0.001 (set train.overwrite=true"
    )
    assert "\n" not in msg and (run / "final" / "model.safetensors").read_bytes() == old_final

    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=1", "train.lr=1e-3", "train.overwrite=true"))
    [previous] = run.glob("previous-*")
    assert (previous / "final" / "model.safetensors").read_bytes() == old_final  # moved aside, not deleted
    assert manifest(previous)["fingerprint"]["train.lr"] == 0.003
    assert manifest(run)["fingerprint"]["train.lr"] == 0.001 and len(manifest(run)["segments"]) == 1


def test_fresh_run_of_the_same_config_keeps_the_old_run(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    for _ in range(2):
        train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=2", "train.save_every=1"))
    [previous] = run.glob("previous-*")
    assert {"final", "checkpoints", "metrics.jsonl", "manifest.json", "config.yaml"} <= {
        p.name for p in previous.iterdir()
    }
    assert [p.name for p in checkpoint.checkpoints(run)] == [
        "step-1",
        "step-2",
    ]  # none of the old run's mixed in
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]


def test_resume_rewinds_the_log_to_the_checkpoint(tmp_path, model_dir, qa_file):
    run = tmp_path / "run"
    train(cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=4", "train.save_every=2"))
    # as if killed after step 4 was logged but before its checkpoint, mid-way through writing a row
    checkpoint.checkpoints(run)[-1].rename(run / "checkpoints" / ".tmp-step-4")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "spl')
    train(
        cfg_for(tmp_path, model_dir, qa_file, "train.max_steps=4", "train.save_every=2", "train.resume=auto")
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    aside = (run / "metrics.rewound.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in aside[:-1]] == [3, 4, 4] and aside[-1] == '{"step": 5, "spl'


def test_allowed_change_the_checkpoint_cannot_hold_is_an_error(tmp_path, model_dir, qa_file):
    lora = ("lora.r=4", "lora.dropout=0.0")
    train(cfg_for(tmp_path, model_dir, qa_file, *FIRST, *lora, "lora.target_modules=[query_key_value]"))
    # more adapted modules than the checkpoint has tensors for: they must not silently start from scratch
    with pytest.raises(
        UserError, match=r"step-2: checkpoint does not match the model \(\d+ trainable tensors missing"
    ):
        train(
            cfg_for(
                tmp_path, model_dir, qa_file, *FIRST, *lora, "train.resume=auto", "train.resume_changed=allow"
            )
        )
