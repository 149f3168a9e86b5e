"""`tunesmith sweep`: set up the study, run trials until none is left (in N local workers), write the results.

A worker's loop: recover trials of dead workers, claim one (a grid point, a recovered trial, or a new
Optuna sample within the budget), train it in its own run dir `<sweep.out_dir>/trial-<n>/` with
train.resume=auto, tell Optuna how it ended. A trial interrupted (Ctrl-C, a killed worker) goes back to
WAITING with its number and run dir, and whoever runs it next resumes from its newest checkpoint: the
trainer's resume is bit-identical, so an interrupted sweep gives the numbers an uninterrupted one would,
and no finished step is trained twice.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import Config, UserError, load_config
from tunesmith.eval.summary import minimized

from . import report
from . import study as studies
from . import trial as trials
from .space import Dim, override, split_args


@dataclass
class Sweep:
    """Everything a worker needs: the config and overrides every trial shares, the swept dimensions."""

    config: Path
    overrides: list[str]
    dims: list[Dim]
    search: bool
    cfg: Config
    sweep_dir: Path
    metric: str
    minimize: bool

    def train_argv(self, params: dict, run_dir: Path) -> list[str]:
        """`train` argv of a trial: the config, the shared overrides, the point, its run dir, resume=auto."""
        point = [override(k, v) for k, v in params.items()]
        return ["train", str(self.config), *self.overrides, *point, f"out_dir={run_dir}", "train.resume=auto"]


def _prepare(config: Path, args: list[str], search: bool, budget: int | None) -> Sweep:
    """Parse and check everything a trial would hit before any trial starts (each grid value, range end)."""
    dims, overrides = split_args(args, search)
    if budget is not None:
        overrides = [*overrides, f"sweep.trials={budget}"]
    cfg = load_config(config, overrides)
    for dim in dims:  # an unknown key or a value of the wrong type fails here, as one line
        for value in dim.candidates():
            load_config(config, [*overrides, override(dim.key, value)])
    metric = cfg.sweep.metric
    field = trials.eval_field(metric)
    if field is not None and cfg.data.test_size == 0 and not cfg.data.test_path:
        raise UserError(f"sweep.metric: {metric} needs a test split (set data.test_size or data.test_path)")
    minimize = minimized(metric, cfg.sweep.direction)
    return Sweep(config.resolve(), overrides, dims, search, cfg, Path(cfg.sweep.out_dir), metric, minimize)


def _signature(sw: Sweep) -> dict:
    """What makes a study this sweep's: resuming with other keys, config or overrides is refused."""
    return {
        "mode": "search" if sw.search else "grid",
        "dims": [d.spec for d in sw.dims],
        "metric": sw.metric,
        "minimize": sw.minimize,
        "config_sha256": hashlib.sha256(sw.config.read_bytes()).hexdigest(),
        "overrides": [o for o in sw.overrides if not o.startswith("sweep.")],
    }


def _open(sw: Sweep):
    sw.sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = studies.storage_for(sw.cfg.sweep.storage, sw.sweep_dir)
    name = sw.cfg.sweep.study or sw.sweep_dir.resolve().name
    direction = "minimize" if sw.minimize else "maximize"
    study = studies.open_study(storage, name, direction, _signature(sw), sw.dims, grid=not sw.search)
    return study, storage


def _run_one(sw: Sweep, study, storage, trial) -> trials.Outcome:
    """Train one claimed trial to its end and tell Optuna; an interrupted one goes back to WAITING."""
    from optuna.trial import TrialState

    if sw.search:  # trial n samples with seed train.seed + n: reproducible, and no two workers draw alike
        import optuna

        study.sampler = optuna.samplers.TPESampler(seed=sw.cfg.train.seed + trial.number)
    run_dir = Path(trial.user_attrs.get("run_dir") or sw.sweep_dir / f"trial-{trial.number}")
    studies.stamp(trial, run_dir)
    params = {d.key: d.suggest(trial) for d in sw.dims}
    log = sw.sweep_dir / "logs" / f"trial-{trial.number}.log"
    print(
        f"trial {trial.number}: {' '.join(override(k, v) for k, v in params.items())} -> {run_dir}",
        flush=True,
    )
    try:
        field = trials.eval_field(sw.metric)
        prune = sw.search and sw.cfg.sweep.prune and field is not None
        proc = trials.launch(sw.train_argv(params, run_dir), log)
        pruned = trials.follow(trial, proc, run_dir, field, prune)
        result = trials.outcome(proc.returncode, pruned, log)
        if (
            result.status == "complete"
            and field is None
            and not (run_dir / "eval" / "metrics.json").is_file()
        ):
            result = _compare(sw, trial, params, run_dir, log)
    except KeyboardInterrupt:
        storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
        raise
    if result.status == "complete":
        result.value, result.note = trials.final_value(run_dir, sw.metric)
        result.status = "complete" if result.value is not None else "failed"
    trial.set_user_attr("note", result.note)
    if result.status in ("interrupted", "user_error"):
        storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
    elif result.status == "complete":
        study.tell(trial, result.value)
    else:
        study.tell(trial, state=TrialState.PRUNED if result.status == "pruned" else TrialState.FAIL)
    shown = f"{sw.metric}={result.value:.5g}" if result.value is not None else result.note
    print(f"trial {trial.number}: {result.status} {shown}", flush=True)
    return result


def _compare(sw: Sweep, trial, params: dict, run_dir: Path, log: Path) -> trials.Outcome:
    """A compare metric: run `tunesmith compare` on the trial's run dir (writes <run>/eval/metrics.json)."""
    argv = ["compare", *sw.train_argv(params, run_dir)[1:-1]]  # no train.resume: compare reads final/
    proc = trials.launch(argv, log)
    trials.follow(trial, proc, run_dir, None, prune=False)  # waits, beating the heartbeat
    return trials.outcome(proc.returncode, False, log)


def work(sw: Sweep, study, storage) -> int:
    """Run trials until none is left for this worker: 0, or the exit code of a trainer stopped by a signal."""
    budget = sw.cfg.sweep.trials if sw.search else None
    while True:
        back = studies.recover_stale(study, storage)
        if back:
            print(f"trials {back} were left running by a stopped worker: back in the queue", flush=True)
        trial = studies.claim(study, storage, budget)
        if trial is None:
            wait = studies.grace_left(study)
            if wait == 0:
                return 0
            time.sleep(wait)  # a trial of a dead worker here, claimed moments ago: take it back, then go on
            continue
        result = _run_one(sw, study, storage, trial)
        if result.status == "user_error":
            raise UserError(f"sweep: trial {trial.number}: {result.note} (log: {sw.sweep_dir / 'logs'})")
        if result.status == "interrupted":  # stopped from outside (preemption, Ctrl-C): so does this worker
            return result.rc


def _spawn_workers(config: Path, args: list[str], search: bool, budget: int | None, n: int, sweep_dir: Path):
    """n more workers: this same command with --workers 1, each logging to <sweep dir>/worker-<i>.log."""
    argv = ["sweep", str(config), "--search" if search else "--grid", *args, "--workers", "1"]
    if budget is not None:
        argv += ["--trials", str(budget)]
    return [trials.launch(argv, sweep_dir / f"worker-{i}.log") for i in range(1, n + 1)]


def finish(sw: Sweep, study, console) -> dict:
    """Write results.jsonl/.csv, the per-key plots and best.yaml; print the table; return the summary."""
    rows = report.result_rows(study, sw.metric)
    report.write_results(rows, sw.dims, sw.metric, sw.sweep_dir)
    plots = [
        str(report.plot_path(sw.sweep_dir, d.key))
        for d in sw.dims
        if report.plot_key(rows, d, sw.metric, sw.minimize, report.plot_path(sw.sweep_dir, d.key))
    ]
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = (min if sw.minimize else max)(done, key=lambda t: t.value) if done else None
    best_yaml = report.write_best(sw.config, sw.overrides, best, sw.metric, sw.sweep_dir) if best else None
    report.print_table(rows, sw.dims, sw.metric, best.number if best else None, console)
    if best is not None:
        console.print(f"best: trial {best.number} {sw.metric}={best.value:.5g}  config: {best_yaml}")
    return {"rows": rows, "best": best.number if best else None, "plots": plots, "best_yaml": best_yaml}


def sweep(config: Path, args: list[str], search: bool, budget: int | None, workers: int, console) -> dict:
    """`tunesmith sweep`: run the grid or search over `args` with `workers` local workers; the summary."""
    if workers < 1:
        raise UserError(f"sweep: --workers must be >= 1 (got {workers})")
    sw = _prepare(config, args, search, budget)
    study, storage = _open(sw)
    children = _spawn_workers(sw.config, args, search, budget, workers - 1, sw.sweep_dir)
    try:
        stopped = work(sw, study, storage)
    finally:
        for i, child in enumerate(children, 1):
            try:
                code = child.wait()
            except KeyboardInterrupt:
                code = child.wait()
            if code != 0:
                print(
                    f"worker {i} exited with code {code}: see {sw.sweep_dir / f'worker-{i}.log'}",
                    file=sys.stderr,
                )
    summary = finish(sw, study, console)
    if stopped:
        console.print("stopped by a signal: run the same command again to resume")
        raise SystemExit(stopped)  # as the trainer does: 128 + the signal
    return summary
