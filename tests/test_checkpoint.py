"""Checkpoints that heal: checksums written with each one, verified on resume; a corrupt newest checkpoint
is named and the newest intact one is used; none intact, or a corrupt one given by path, is a one-line
UserError."""

import hashlib
import json
import shutil

import pytest
import torch

from tests import tiny
from tests.test_train import cfg_for, weights
from tunesmith.config import UserError
from tunesmith.train import checkpoint
from tunesmith.train.loop import train

STEPS = ("train.max_steps=3", "train.save_every=1", "train.keep_last=3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 3-step run with checkpoints step-1..3, trained once for the whole module."""
    base = tmp_path_factory.mktemp("trained")
    model_dir, data = tiny.save_model_dir(base / "m"), tiny.write_qa(base / "qa.jsonl")
    train(cfg_for(base, model_dir, data, *STEPS))
    return base / "run", model_dir, data


@pytest.fixture
def run(trained, tmp_path):
    """This test's own copy of the trained run (at tmp_path/run, where cfg_for points)."""
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def resume_cfg(tmp_path, trained, *over):
    return cfg_for(tmp_path, trained[1], trained[2], *STEPS, "train.resume=auto", *over)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def step(run, n):
    return run / "checkpoints" / f"step-{n}"


def test_checksums_cover_every_file(run):
    for ckpt in checkpoint.checkpoints(run):
        listed = json.loads((ckpt / "checksums.json").read_text())["files"]
        assert set(listed) == {"trainable.safetensors", "state.pt", "cursor.json", "fingerprint.json"}
        for name, entry in listed.items():
            data = (ckpt / name).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        assert checkpoint.verify(ckpt) is None


def test_truncated_newest_weights_resume_from_the_previous_one(run, tmp_path, trained, capsys):
    uninterrupted = weights(run / "final")
    truncate(step(run, 3) / "trainable.safetensors")
    train(resume_cfg(tmp_path, trained))
    out, err = capsys.readouterr()
    assert f"warning: checkpoint {step(run, 3)} is corrupt (trainable.safetensors has " in err
    assert "were written (truncated?))" in err
    assert f"resumed from {step(run, 2)} at step 2" in out
    resumed = weights(
        run / "final"
    )  # step 3 redone from step-2: the same weights as the run that never broke
    assert resumed.keys() == uninterrupted.keys() and all(
        torch.equal(resumed[k], uninterrupted[k]) for k in resumed
    )
    assert checkpoint.verify(step(run, 3)) is None  # re-saved whole


def test_flipped_byte_in_state_resumes_from_the_previous_one(run, capsys):
    flip_byte(step(run, 3) / "state.pt")
    assert checkpoint.find_resume("auto", run) == step(run, 2)
    err = capsys.readouterr().err
    assert f"checkpoint {step(run, 3)} is corrupt (state.pt does not match its sha256 (corrupt))" in err


def test_no_intact_checkpoint_is_a_one_line_user_error(run, tmp_path, trained):
    truncate(step(run, 3) / "trainable.safetensors")
    flip_byte(step(run, 2) / "state.pt")
    flip_byte(step(run, 1) / "cursor.json")
    with pytest.raises(UserError) as e:
        train(resume_cfg(tmp_path, trained))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"{run}: no intact checkpoint to resume from (step-3: trainable.safetensors"
    )
    assert "step-2: state.pt does not match" in msg and "step-1: cursor.json does not match" in msg


def test_corrupt_checkpoint_given_by_path_is_an_error_not_a_fallback(run):
    flip_byte(step(run, 3) / "trainable.safetensors")
    with pytest.raises(
        UserError, match=r"step-3: corrupt checkpoint \(trainable.safetensors does not match its sha256"
    ):
        checkpoint.find_resume(str(step(run, 3)), run)
    assert checkpoint.find_resume(str(step(run, 2)), run) == step(run, 2)


def test_checkpoint_without_checksums_is_used_if_it_loads(run, capsys):
    # as written by a tunesmith before checksums: only loading it can tell
    (step(run, 3) / "checksums.json").unlink()
    assert checkpoint.find_resume("auto", run) == step(run, 3)
    assert "has no checksums (older tunesmith); it loads, so it is used" in capsys.readouterr().err
    truncate(step(run, 3) / "state.pt")
    assert checkpoint.find_resume("auto", run) == step(run, 2)
    assert f"checkpoint {step(run, 3)} is corrupt (does not load: " in capsys.readouterr().err


def test_unlisted_or_missing_file_is_corrupt(run):
    (step(run, 3) / "cursor.json").unlink()
    (step(run, 3) / "cursor.json").write_text("{}")
    (step(run, 2) / "state.pt").unlink()
    assert checkpoint.verify(step(run, 3)).startswith("cursor.json has 2 bytes")
    assert checkpoint.verify(step(run, 2)) == "state.pt is missing"
    (step(run, 1) / "checksums.json").write_text("{not json")
    assert checkpoint.verify(step(run, 1)) == "checksums.json is unreadable"
