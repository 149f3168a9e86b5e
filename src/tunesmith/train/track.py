"""Experiment trackers (train.report_to): each logs through its own library, offline-first, on rank 0 only.

A tracker logs the hyperparameters (the resolved config, flattened to dotted keys) when it opens, then has
the same three methods: `metrics(row)` for each metrics.jsonl row, `artifact(path)` for a file or a model dir,
and `close(status)`. The loop holds a plain list of them: MetricsLog fans every row out, `finish` logs the run
record and closes. Where each one writes, unless the user's own environment points it elsewhere:

  tensorboard  <run>/tensorboard/            event files (scalars, the config as hparams, JSON/YAML as text)
  mlflow       <run>/mlflow/mlflow.db        SQLite store, artifacts in <run>/mlflow/artifacts/
               (MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME win when set)
  wandb        <run>/wandb/offline-run-*/    offline unless WANDB_MODE says otherwise (`wandb sync` uploads)
  trackio      trackio's own local store     TRACKIO_DIR (default ~/.cache/huggingface/trackio), project
               'tunesmith' (TRACKIO_PROJECT): trackio fixes its directory when it is first imported

<run>/tracking.json keeps each tracker's run id, so a resumed segment continues the same tracker run, and
`log_report` adds what `tunesmith compare` measured (eval/metrics.json, report.html) to it afterwards.

A resume goes back to a checkpoint and redoes the steps after it, whose rows the tracker run may already hold
(a kill after a log row but before the next checkpoint; train/log.py's `rewind` moved them to
metrics.rewound.jsonl). With nothing changed the redone rows equal those (the resume is bit-identical), so a
continued tracker is not sent them again (`Continued`): one point per step. With changes let through
(train.resume_changed=allow) they differ: they are sent, so the tracker holds both values at those steps, and
the param `resume.redone_after_step_<N>` says which steps were redone and what changed. TensorBoard needs
neither: its purge_step hides the old events of the redone steps.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from tunesmith.config import Config, UserError
from tunesmith.train.record import read_manifest

# the modules each tracker imports (MLflow's SQLite store needs sqlalchemy and alembic, not in mlflow-skinny)
PACKAGES = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
    "trackio": ("trackio",),
    "wandb": ("wandb",),
}
# the run record, logged as artifacts when a segment ends (those that exist)
RECORD_FILES = ("config.yaml", "manifest.json", "plan.json", "loss.png", "train_result.json")
IDS_FILE = "tracking.json"
PROJECT = "tunesmith"
# a segment's end (manifest.json) -> MLflow's run status and W&B's exit code
_STATUS = {
    "finished": ("FINISHED", 0),
    "stopped": ("KILLED", 1),
    "diverged": ("FAILED", 1),
    "failed": ("FAILED", 1),
}


class Tracker(Protocol):
    """What the loop needs of a tracker; each opens with the hyperparameters already logged."""

    id: object  # what tracking.json keeps to log on to the same run later (a resume, log_report)

    def metrics(self, row: dict) -> None: ...
    def artifact(self, path: Path) -> None: ...
    def close(self, status: str) -> None: ...


def missing_packages(report_to: list[str]) -> list[str]:
    """One message per tracker whose package does not import (pre-flight: before any weight moves)."""
    errors = []
    for name in report_to:
        modules = (
            PACKAGES[name][:1]
            if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI")
            else PACKAGES[name]
        )
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:
                errors.append(
                    f"train.report_to=[{name}] needs the {module} package "
                    "(pip install 'tunesmith[track]', or drop it from train.report_to)"
                )
                break
    return errors


def flat_params(cfg: Config) -> dict[str, str | int | float | bool | None]:
    """The resolved config as dotted keys (`train.lr`); lists and dicts as JSON text."""
    out: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else value

    walk("", cfg.model_dump(mode="json"))
    return out


def scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's numbers under `<split>/<key>` (`train/loss`, `eval/perplexity`)."""
    split = row.get("split", "train")
    return {
        f"{split}/{k}": float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


def open_trackers(cfg: Config, run: Path, start: int) -> list[Tracker]:
    """One tracker per train.report_to entry, hyperparameters logged; ids kept in <run>/tracking.json.

    `start` > 0: this segment resumes from the checkpoint at that step, so each tracker continues the run it
    logged before. Call on rank 0 only (other ranks get []).
    """
    if not cfg.train.report_to:
        return []
    ids_path = run / IDS_FILE
    ids = json.loads(ids_path.read_text()) if start and ids_path.is_file() else {}
    params = flat_params(cfg)
    segments = ((read_manifest(run) or {}).get("segments") or [{}]) if start else [{}]
    changed = [c["key"] for c in segments[-1].get("changed") or []]
    # the steps after the checkpoint that were logged before (earlier resumes' rows may lie at or before it)
    through = {k: v for k, v in logged_through(run / "metrics.rewound.jsonl").items() if v > start}
    if changed and through:  # redone steps that differ from the logged ones: sent again, and said so
        last = max(through.values())
        params[f"resume.redone_after_step_{start}"] = (
            f"steps {start + 1}..{last} logged again by a resume with train.resume_changed=allow "
            f"(changed: {', '.join(changed)}): the later value at each of those steps is this segment's"
        )
    opened = {kind: _open(kind, run, params, ids.get(kind), start) for kind in cfg.train.report_to}
    ids_path.write_text(json.dumps({**ids, **{k: t.id for k, t in opened.items()}}, indent=2) + "\n")
    return [
        Continued(t, through)
        if through and not changed and kind != "tensorboard" and t.id == ids.get(kind)
        else t
        for kind, t in opened.items()
    ]


def logged_through(rewound: Path) -> dict[str, int]:
    """The last step of each split (train, eval) in metrics.rewound.jsonl: rows sent before the resume's
    checkpoint was reached (a line cut short by a kill tells nothing and is passed over)."""
    through: dict[str, int] = {}
    lines = rewound.read_text().splitlines() if rewound.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            split = row.get("split", "train")
            through[split] = max(through.get(split, row["step"]), row["step"])
    return through


class Continued:
    """A tracker that continues its run after an unchanged resume: a row at a step its run already holds for
    that split (the resume redoes it, equal) is not sent again."""

    def __init__(self, tracker: Tracker, through: dict[str, int]):
        self.tracker, self.through, self.id = tracker, through, tracker.id

    def metrics(self, row: dict) -> None:
        if row["step"] > self.through.get(row.get("split", "train"), -1):
            self.tracker.metrics(row)

    def artifact(self, path: Path) -> None:
        self.tracker.artifact(path)

    def close(self, status: str) -> None:
        self.tracker.close(status)


def _open(kind: str, run: Path, params: dict, previous, start: int) -> Tracker:
    """The tracker of one train.report_to entry; `previous`: its id in tracking.json (log on to that run)."""
    name = run.resolve().name
    if kind == "tensorboard":
        return TensorBoard(run, params, start)
    if kind == "mlflow":
        return MLflow(run, name, params, previous)
    if kind == "wandb":
        return WandB(run, name, params, previous)
    return Trackio(name, params, previous)


def log_report(cfg: Config) -> int:
    """After `tunesmith compare`: eval/metrics.json's numbers (`compare/<system>/<metric>`, at the run's last
    step) and the report files join the tracker runs the training logged to; returns how many trackers."""
    run = Path(cfg.out_dir)
    ids_path, eval_dir = run / IDS_FILE, run / "eval"
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    kinds = [k for k in cfg.train.report_to if k in ids]  # a tracker the training did not use has no run
    if not kinds or not (eval_dir / "metrics.json").is_file():
        return 0
    errors = missing_packages(kinds)
    if errors:
        raise UserError(errors[0])
    segments = (read_manifest(run) or {}).get("segments") or [{}]
    row = {"step": segments[-1].get("ended_at_step") or 0, "split": "compare"}
    for system, values in json.loads((eval_dir / "metrics.json").read_text()).items():
        if isinstance(values, dict):
            row.update({f"{system}/{k}": v for k, v in values.items()})
    params = flat_params(cfg)
    for kind in kinds:
        tracker = _open(kind, run, params, ids[kind], 0)
        tracker.metrics(row)
        for path in sorted(eval_dir.iterdir()):
            if path.name in ("metrics.json", "report.html") or path.suffix == ".png":
                tracker.artifact(path)
        tracker.close("finished")
    return len(kinds)


def finish(trackers: list[Tracker], run: Path, status: str, model: Path | None = None) -> None:
    """Log the run record (and `model`, a final/ dir, when asked) to every tracker, then close each.

    `status`: finished, stopped or diverged, as the manifest's segment says.
    """
    for tracker in trackers:
        for name in RECORD_FILES:
            if (run / name).is_file():
                tracker.artifact(run / name)
        if model is not None and model.is_dir():
            tracker.artifact(model)
        tracker.close(status)


@contextmanager
def closed_on_error(trackers: list[Tracker], run: Path) -> Iterator[None]:
    """An exception out of the block closes every tracker with the segment's status in manifest.json
    (diverged, failed: so list this before record.failed_on_error, which writes it), then propagates."""
    try:
        yield
    except BaseException:
        segments = (read_manifest(run) or {}).get("segments") or [{}]
        status = segments[-1].get("status")
        finish(trackers, run, status if status in _STATUS else "failed")
        raise


def _safe_name(text: str) -> str:
    """Artifact names trackers accept: letters, digits, '-', '_', '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


class TensorBoard:
    """torch's SummaryWriter under <run>/tensorboard; the config through the hparams plugin."""

    def __init__(self, run: Path, params: dict, start: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.id = str(run / "tensorboard")
        # a resumed segment redoes the steps after its checkpoint: purge_step hides their earlier events
        self.writer = SummaryWriter(self.id, purge_step=start or None)
        shown = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in params.items()}
        for summary in hparams(shown, {}):
            self.writer.file_writer.add_summary(summary)

    def metrics(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def artifact(self, path: Path) -> None:
        # TensorBoard keeps no files: text records go to its Text tab, images and model dirs are skipped
        if path.is_file() and path.suffix in (".json", ".yaml"):
            self.writer.add_text(f"run/{path.name}", "```\n" + path.read_text() + "\n```")

    def close(self, status: str) -> None:
        self.writer.close()


class MLflow:
    """MlflowClient on a SQLite store under <run>/mlflow (MLflow 3 keeps file stores in maintenance mode)."""

    def __init__(self, run: Path, name: str, params: dict, previous: dict | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        store = run.resolve() / "mlflow"
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store / 'mlflow.db'}"
        store.mkdir(exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        if previous and previous.get("uri") == uri:
            run_id = previous["run_id"]
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            found = self.client.get_experiment_by_name(experiment)
            exp_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(
                    experiment,
                    artifact_location=None
                    if os.environ.get("MLFLOW_TRACKING_URI")
                    else (store / "artifacts").as_uri(),
                )
            )
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.id = {"uri": uri, "run_id": run_id}
        # params cannot change once logged: a resumed segment adds new keys; a changed value is a tag
        logged = self.client.get_run(run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in logged]
        changed = {f"resumed.{k}": str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
        self.client.log_batch(run_id, params=fresh)
        for key, value in changed.items():
            self.client.set_tag(run_id, key, value)

    def metrics(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, row["step"]) for k, v in scalars(row).items()]
        self.client.log_batch(self.id["run_id"], metrics=batch)

    def artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.id["run_id"], str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.id["run_id"], str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.id["run_id"], _STATUS[status][0])


class WandB:
    """An offline W&B run under <run>/wandb (no API key, no network); `wandb sync` can upload it later."""

    def __init__(self, run: Path, name: str, params: dict, previous: str | None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=name,
            id=previous,
            resume="allow" if previous else None,
            dir=str(run),
            mode=os.environ.get("WANDB_MODE") or "offline",
            config=params,
            allow_val_change=True,  # a resumed segment may change a log-only key (train.log_every, ...)
            reinit="create_new",
            # console capture would wrap stdout (and its isatty) under the progress display
            settings=wandb.Settings(console="off", silent=True),
        )
        self.id = self.run.id

    def metrics(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def artifact(self, path: Path) -> None:
        import wandb

        art = wandb.Artifact(
            _safe_name(f"{self.run.name}-{path.name}"), type="model" if path.is_dir() else "run-record"
        )
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=_STATUS[status][1])


class Trackio:
    """A local trackio run in project 'tunesmith' (or TRACKIO_PROJECT); `trackio show` opens its dashboard."""

    def __init__(self, name: str, params: dict, previous: str | None):
        import trackio

        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT") or PROJECT,
            name=previous or name,
            config=params,
            resume="allow" if previous else "never",
            embed=False,
            auto_log_cpu=False,
        )
        self.id = self.run.name

    def metrics(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def artifact(self, path: Path) -> None:
        # artifacts belong to the project: the run's name keeps two runs' manifest.json apart
        kind = "model" if path.is_dir() else "run-record"
        self.run.log_artifact(path, name=_safe_name(f"{self.run.name}-{path.name}"), type=kind)

    def close(self, status: str) -> None:
        self.run.finish()
