"""train.report_to: one tiny CLI run logs to every tracker installed here; each is read back through its
own library (MlflowClient, trackio's storage, TensorBoard's EventAccumulator, W&B's protobuf records) and
must hold the config, exactly the rows of metrics.jsonl, and the run record as artifacts. A tracker whose
package is missing stops the run before training with one line."""

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import tiny
from tunesmith import cli
from tunesmith.config import load_config
from tunesmith.train.track import PACKAGES, flat_params, log_report, scalars

ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY, EVAL_EVERY = 6, 2, 3
INSTALLED = [k for k, mods in PACKAGES.items() if all(importlib.util.find_spec(m) for m in mods)]
RECORD = {"config.yaml", "manifest.json", "plan.json", "loss.png", "train_result.json"}


def needs(kind: str):
    return pytest.mark.skipif(
        kind not in INSTALLED, reason=f"{kind} is not installed here (pip install 'tunesmith[track]')"
    )


def _env(tmp: Path) -> dict:
    """The user's tracker settings removed, so each tracker takes its offline default; caches under tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_", "TRACKIO_"))}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRACKIO_DIR": str(tmp / "trackio"),
        "WANDB_DATA_DIR": str(tmp / "wandb-data"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
    }


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One CLI run into <tmp>/run logging to every installed tracker, final/ included (train.report_model)."""
    if not INSTALLED:
        pytest.skip("no tracker package is installed here (pip install 'tunesmith[track]')")
    tmp = tmp_path_factory.mktemp("tracked")
    command = tiny.train_command(
        tmp,
        f"train.max_steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        f"train.eval_every={EVAL_EVERY}",
        f"train.report_to=[{','.join(INSTALLED)}]",
        "train.report_model=true",
    )
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 6]  # the run logged what the tests expect
    return tmp, run, rows


def expected(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(key, step) -> value of every number in metrics.jsonl, as trackers name them (`train/loss`)."""
    return {(k, r["step"]): v for r in rows for k, v in scalars(r).items()}


def config_params(run: Path) -> dict:
    """The flattened resolved config the run wrote (config.yaml), as the trackers were given it."""
    return flat_params(load_config(run / "config.yaml", []))


@needs("mlflow")
def test_mlflow_store_holds_params_metrics_and_record(tracked):
    from mlflow.tracking import MlflowClient

    _, run, rows = tracked
    ids = json.loads((run / "tracking.json").read_text())["mlflow"]
    assert ids["uri"] == f"sqlite:///{run.resolve() / 'mlflow' / 'mlflow.db'}"  # local store in the run dir
    client = MlflowClient(tracking_uri=ids["uri"])
    got = client.get_run(ids["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert got.data.params == {k: str(v) for k, v in config_params(run).items()}
    history = {
        (key, m.step): m.value
        for key in got.data.metrics
        for m in client.get_metric_history(ids["run_id"], key)
    }
    assert history == expected(rows)
    logged = {a.path for a in client.list_artifacts(ids["run_id"])}
    assert logged == RECORD | {"final"}
    assert "config.json" in {Path(a.path).name for a in client.list_artifacts(ids["run_id"], "final")}
    # the artifacts live under the run dir too
    assert (run / "mlflow" / "artifacts").is_dir()


@needs("tensorboard")
def test_tensorboard_events_hold_scalars_hparams_and_record(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run, rows = tracked
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = expected(rows)
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())  # float32 in the event file
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(config_params(run)["train.lr"])
    assert start.hparams["model.name"].string_value == config_params(run)["model.name"]
    text = events.Tensors("run/manifest.json/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n"))["segments"][-1]["status"] == "finished"


# trackio fixes its directory when first imported, so it is read in a process started with TRACKIO_DIR set
READ_TRACKIO = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage as S
name = sys.argv[1]
print(json.dumps({"runs": S.get_runs("tunesmith"), "logs": S.get_logs("tunesmith", name),
                  "config": S.get_run_config("tunesmith", name),
                  "artifacts": S.get_run_artifacts("tunesmith", name, None)}, default=str))
"""


@needs("trackio")
def test_trackio_store_holds_config_metrics_and_record(tracked):
    tmp, run, rows = tracked
    name = json.loads((run / "tracking.json").read_text())["trackio"]
    read = subprocess.run(
        [sys.executable, "-c", READ_TRACKIO, name], env=_env(tmp), capture_output=True, text=True, timeout=120
    )
    assert read.returncode == 0, read.stderr[-2000:]
    got = json.loads(read.stdout.strip().splitlines()[-1])
    assert got["runs"] == ["run"]
    logged = {
        (k, log["step"]): v for log in got["logs"] for k, v in log.items() if k not in ("step", "timestamp")
    }
    assert logged == expected(rows)
    config = {k: v for k, v in got["config"].items() if not k.startswith("_")}
    assert config == config_params(run)
    assert {a["name"] for a in got["artifacts"]["output"]} == {f"run-{n}" for n in RECORD | {"final"}}


def wandb_records(path: Path):
    """The records of an offline .wandb file, decoded with the wandb package's own protobuf schema.

    wandb 0.31 ships no Python reader (its Go core writes the file); the framing is a LevelDB log: a 7-byte
    ':W&B' header, then 32 KiB blocks of chunks (crc32c, length u16, type u8: 1 full, 2 first, 3 middle,
    4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


@needs("wandb")
def test_wandb_offline_run_holds_config_metrics_and_record(tracked):
    _, run, rows = tracked
    run_id = json.loads((run / "tracking.json").read_text())["wandb"]
    (path,) = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")  # offline, under the run dir
    records = list(wandb_records(path))
    kinds = [r.WhichOneof("record_type") for r in records]
    history = {
        (item.key or "/".join(item.nested_key), r.history.step.num): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    # wandb adds its own _step, _runtime, _timestamp
    assert {k: v for k, v in history.items() if not k[0].startswith("_")} == expected(rows)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in start.config.update if not i.key.startswith("_")}
    assert config == config_params(run)
    artifacts = {r.artifact.type: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    assert artifacts.keys() == {"run-record", "model"}
    names = {r.artifact.name for r in records if r.WhichOneof("record_type") == "artifact"}
    assert {n.removeprefix("run-") for n in names} == RECORD | {"final"}
    assert "exit" in kinds and [r.exit.exit_code for r in records if r.exit.ByteSize()] == [0]


@pytest.mark.parametrize("kind", sorted(PACKAGES))
def test_missing_tracker_package_is_one_line_before_training(
    kind, tmp_path, monkeypatch, capsys, model_dir, qa_file
):
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, PACKAGES[kind][0], None)  # `import <it>` now raises ImportError
    (tmp_path / "c.yaml").write_text("data: {format: qa}\n")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "tunesmith",
            "train",
            str(tmp_path / "c.yaml"),
            f"model.name={model_dir}",
            f"data.path={qa_file}",
            f"out_dir={tmp_path / 'run'}",
            f"train.report_to=[{kind}]",
        ],
    )
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip() == (
        f"error: train.report_to=[{kind}] needs the {PACKAGES[kind][0]} package "
        "(pip install 'tunesmith[track]', or drop it from train.report_to)"
    )
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        and not (tmp_path / "run" / "manifest.json").exists()
    )


def test_flat_params_are_dotted_scalars(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "train.report_to=[mlflow,wandb]", f"out_dir={tmp_path}"])
    flat = flat_params(cfg)
    assert flat["train.lr"] == 3e-4 and flat["out_dir"] == str(tmp_path)
    assert flat["train.report_to"] == '["mlflow", "wandb"]'  # a list is one JSON value
    assert yaml.safe_load(flat["train.betas"]) == [0.9, 0.999]
    assert not any(isinstance(v, (dict, list)) for v in flat.values())


def _in_process_cfg(tmp_path: Path, model_dir: Path, qa_file: Path, *over: str):
    base = ["train.log_every=1", "train.report_to=[mlflow]", *over]
    return load_config(None, tiny.train_overrides(model_dir, qa_file, tmp_path / "run", *base))


def _mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=ids["uri"])
    return client, client.get_run(ids["run_id"])


@needs("mlflow")
def test_resumed_segment_continues_the_same_mlflow_run(tmp_path, model_dir, qa_file, monkeypatch):
    from tunesmith.train import loop as loop_mod

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    common = ["train.max_steps=4", "train.save_every=2"]
    calls, real = {"n": 0}, loop_mod.loss_sum

    def sigterm_at_step_2(model, batch, smoothing):  # one micro-batch per step: call n is step n
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes step 2, checkpoints it and exits
        return real(model, batch, smoothing)

    monkeypatch.setattr(loop_mod, "loss_sum", sigterm_at_step_2)
    with pytest.raises(SystemExit):
        loop_mod.train(_in_process_cfg(tmp_path, model_dir, qa_file, *common))
    run = tmp_path / "run"
    client, first = _mlflow_run(run)
    assert first.info.status == "KILLED"
    monkeypatch.setattr(loop_mod, "loss_sum", real)
    loop_mod.train(_in_process_cfg(tmp_path, model_dir, qa_file, *common, "train.resume=auto"))
    client, resumed = _mlflow_run(run)
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    assert len(client.search_runs([resumed.info.experiment_id])) == 1  # one run, two segments
    history = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert sorted(history) == [1, 2, 3, 4]
    # params are written once; the segment's changed log-only key is a tag
    assert resumed.data.params["train.resume"] == "never"
    assert resumed.data.tags["resumed.train.resume"] == "auto"


def _crash_in_step(monkeypatch, step: int) -> None:
    """The forward of `step` raises (one micro-batch per step): the steps before it are logged; it fails."""
    from tunesmith.train import loop as loop_mod

    calls, real = {"n": 0}, loop_mod.loss_sum

    def crash(model, batch, smoothing):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("the machine went away")
        return real(model, batch, smoothing)

    monkeypatch.setattr(loop_mod, "loss_sum", crash)


def _crashed_then_resumed(tmp_path, model_dir, qa_file, monkeypatch, *resume_over: str) -> Path:
    """Steps 1-3 logged, checkpoint at 2, a crash in step 4; then a resume redoes step 3 and ends at 4."""
    from tunesmith.train import loop as loop_mod

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    common = ["train.max_steps=4", "train.save_every=2", "train.eval_every=0"]
    real = loop_mod.loss_sum
    _crash_in_step(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="went away"):
        loop_mod.train(_in_process_cfg(tmp_path, model_dir, qa_file, *common))
    monkeypatch.setattr(loop_mod, "loss_sum", real)
    loop_mod.train(_in_process_cfg(tmp_path, model_dir, qa_file, *common, "train.resume=auto", *resume_over))
    return tmp_path / "run"


@needs("mlflow")
def test_an_unchanged_resume_sends_no_step_twice(tmp_path, model_dir, qa_file, monkeypatch):
    run = _crashed_then_resumed(tmp_path, model_dir, qa_file, monkeypatch)
    rewound = [json.loads(x) for x in (run / "metrics.rewound.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rewound] == [3]  # logged by the crashed segment, redone by the resume
    client, got = _mlflow_run(run)
    history = client.get_metric_history(got.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # one value per step
    # MLflow keeps the crashed segment's value at step 3, equal to the redone one (bit-identical resume)
    redone = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert {m.step: m.value for m in history}[3] == rewound[0]["loss"] == redone[3]
    assert not any(k.startswith("resume.redone_after_step") for k in got.data.params)


@needs("mlflow")
def test_a_changed_resume_logs_the_redone_steps_and_says_so(tmp_path, model_dir, qa_file, monkeypatch):
    run = _crashed_then_resumed(
        tmp_path, model_dir, qa_file, monkeypatch, "train.lr=1e-3", "train.resume_changed=allow"
    )
    client, got = _mlflow_run(run)
    steps = sorted(m.step for m in client.get_metric_history(got.info.run_id, "train/loss"))
    assert steps == [1, 2, 3, 3, 4]  # step 3 trained twice, at two learning rates: both values kept
    assert got.data.params["resume.redone_after_step_2"] == (
        "steps 3..3 logged again by a resume with train.resume_changed=allow (changed: train.lr): "
        "the later value at each of those steps is this segment's"
    )


@needs("mlflow")
def test_diverged_run_closes_its_mlflow_run_as_failed(tmp_path, model_dir, qa_file, monkeypatch):
    from tunesmith.train import loop as loop_mod
    from tunesmith.train.loop import TrainingDiverged

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    real, calls = loop_mod.loss_sum, {"n": 0}

    def nan_at_step_2(model, batch, smoothing):
        calls["n"] += 1
        total, n = real(model, batch, smoothing)
        return (total * float("nan") if calls["n"] == 2 else total), n

    monkeypatch.setattr(loop_mod, "loss_sum", nan_at_step_2)
    with pytest.raises(TrainingDiverged):
        loop_mod.train(_in_process_cfg(tmp_path, model_dir, qa_file, "train.max_steps=4"))
    client, got = _mlflow_run(tmp_path / "run")
    assert got.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(got.info.run_id, "train/loss")] == [1]
    manifest = client.download_artifacts(got.info.run_id, "manifest.json", str(tmp_path))
    assert json.loads(Path(manifest).read_text())["segments"][-1]["status"] == "diverged"


@needs("mlflow")
def test_compare_report_joins_the_training_mlflow_run(tmp_path, model_dir, qa_file, monkeypatch):
    from tunesmith.train.loop import train

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    cfg = _in_process_cfg(tmp_path, model_dir, qa_file, "train.max_steps=2")
    train(cfg)
    run = tmp_path / "run"
    # what `tunesmith compare` leaves in eval/ (its metrics.json: one entry per system)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(
        json.dumps({"base": {"exact_match": 0.25, "n": 4}, "tuned": {"exact_match": 0.75, "n": 4}})
    )
    (run / "eval" / "report.html").write_text("<html>report</html>")
    (run / "eval" / "predictions.jsonl").write_text("{}\n")
    assert log_report(cfg) == 1
    client, got = _mlflow_run(run)
    assert got.info.status == "FINISHED"
    assert len(client.search_runs([got.info.experiment_id])) == 1  # the training's run, not a new one
    assert [
        (m.step, m.value) for m in client.get_metric_history(got.info.run_id, "compare/tuned/exact_match")
    ] == [(2, 0.75)]
    logged = {a.path for a in client.list_artifacts(got.info.run_id)}
    assert {"metrics.json", "report.html"} <= logged and "predictions.jsonl" not in logged


def test_compare_report_without_trackers_logs_nothing(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "train.report_to=[mlflow]"])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    assert log_report(cfg) == 0  # the run never opened a tracker: no tracking.json
