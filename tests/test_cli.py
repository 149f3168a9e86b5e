"""The CLI's contract with users: one-line errors with the place, exit code 2, no traceback."""

import sys

import pytest

from tunesmith import cli


def run(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["tunesmith", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_bad_data_row_is_one_line_exit_2(tmp_path, monkeypatch, capsys, model_dir):
    capsys.readouterr()  # drop what building the fixture printed
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": "d"\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {format: qa}\n")
    code, _, err = run(
        monkeypatch,
        capsys,
        "data",
        "inspect",
        str(cfg),
        f"model.name={model_dir}",
        f"data.path={data}",
        f"out_dir={tmp_path / 'run'}",
    )
    assert code == 2
    assert err.startswith(f"error: {data}:2: invalid JSON") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_key_suggests_and_exits_2(monkeypatch, capsys):
    code, _, err = run(
        monkeypatch, capsys, "config", "show", "configs/quickstart.yaml", "train.learning_rate=1e-4"
    )
    assert code == 2 and "unknown key 'train.learning_rate' — did you mean 'train.lr'?" in err


def test_missing_config_file(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "train", "nope.yaml")
    assert code == 2 and err.strip() == "error: nope.yaml: config file not found"


def test_config_show_and_get(monkeypatch, capsys):
    code, out, _ = run(
        monkeypatch, capsys, "config", "get", "configs/quickstart.yaml", "train.lr", "train.lr=3e-4"
    )
    assert code == 0 and out.strip() == "0.0003"
    code, out, _ = run(monkeypatch, capsys, "config", "show", "configs/quickstart.yaml")
    assert code == 0 and "peak learning rate" in out
