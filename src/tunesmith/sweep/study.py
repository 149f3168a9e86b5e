"""The Optuna study every worker shares: storage, creation, the grid queue, claiming, stale-trial recovery.

Workers never coordinate except through the storage (SQLite in the sweep dir, or any RDB URL), so N local
processes and N machines are the same case. A trial is claimed by flipping it WAITING -> RUNNING in one
transaction; on SQLite each transaction is `BEGIN IMMEDIATE` (the read of the state and the write happen under
the write lock), otherwise two workers could both read WAITING and both run the point. A trial left RUNNING by
a worker that died goes back to WAITING with its number, params and run dir, and the next worker resumes it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from tunesmith.config import UserError

from .space import Dim, grid_points

HEARTBEAT_S = 30.0  # a running trial stamps its heartbeat this often
STALE_S = 300.0  # a RUNNING trial whose heartbeat is older than this belongs to a dead worker (any machine)
GRID_WAIT_S = 60.0  # how long a worker waits for the study's creator to enqueue the grid
CLAIM_GRACE_S = 10.0  # a trial claimed this recently is never stale (its new worker is stamping it)


def worker_id() -> str:
    """host:pid, stamped on each trial this process runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _sqlite_immediate(engine) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE (SQLAlchemy's recipe for pysqlite's deferred BEGIN)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_autobegin(dbapi_connection, record) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna created its tables predate the listeners


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(
            "sweep: needs Optuna (pip install 'tunesmith[sweep]', or pip install optuna)"
        ) from None
    return optuna


def storage_for(url: str | None, sweep_dir: Path):
    """Optuna RDB storage: `url` (PostgreSQL, MySQL, SQLite...) or sqlite:///<sweep dir>/study.db."""
    optuna = _optuna()
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    url = url or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    sqlite = url.startswith("sqlite")
    for attempt in range(5):
        try:
            with _creation_lock(sweep_dir if sqlite else None):
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None
                )
            break
        except (ImportError, ModuleNotFoundError) as e:  # e.g. psycopg2 / pymysql for that URL's driver
            raise UserError(f"sweep.storage: {e} (pip install the database driver the URL names)") from None
        except SQLAlchemyError as e:  # a malformed URL, an unreachable server, bad credentials
            # Workers started together on an empty database race to create Optuna's tables (on one machine
            # the lock prevents it); the loser finds them half made and opens the storage again.
            if isinstance(e, ArgumentError) or attempt == 4:
                msg = str(e).splitlines()[0][:200]
                raise UserError(f"sweep.storage: cannot open '{url}' ({msg})") from None
            time.sleep(0.5 + attempt)
    if sqlite:
        _sqlite_immediate(storage.engine)
    return storage


@contextmanager
def _creation_lock(sweep_dir: Path | None) -> Iterator[None]:
    """An exclusive flock on <sweep dir>/.study.lock while the SQLite tables are created (POSIX)."""
    try:
        import fcntl
    except ImportError:  # Windows: the retry in storage_for covers the race
        fcntl = None
    if sweep_dir is None or fcntl is None:
        yield
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".study.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_study(storage, name: str, direction: str, signature: dict[str, Any], dims: list[Dim], grid: bool):
    """Create the study (its creator enqueues the grid) or load it; refuse one recorded for another sweep."""
    optuna = _optuna()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    try:  # the unique study name makes exactly one worker the creator, however many start at once
        study = optuna.create_study(
            storage=storage, study_name=name, direction=direction, pruner=pruner, load_if_exists=False
        )
        study.set_user_attr("sweep", signature)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, pruner=pruner)
        created = False
        _check_same_sweep(study, name, signature)
    if grid:
        _enqueue_grid(study, dims, created)
    return study


def _check_same_sweep(study, name: str, signature: dict[str, Any]) -> None:
    deadline = time.time() + GRID_WAIT_S
    while "sweep" not in study.user_attrs and time.time() < deadline:  # the creator is about to write it
        time.sleep(0.2)
    old = study.user_attrs.get("sweep", signature)
    changed = [k for k in signature if old.get(k) != signature[k]]
    if changed:
        raise UserError(
            f"sweep: study '{name}' was started by another sweep ({', '.join(changed)} differ) "
            "(resume it with the same config and keys, or choose another sweep.out_dir or sweep.study)"
        )


def _enqueue_grid(study, dims: list[Dim], created: bool) -> None:
    """The creator enqueues every point once; another worker waits for that, or finishes a half-done job."""
    if not created:
        deadline = time.time() + GRID_WAIT_S
        while not study.user_attrs.get("grid_ready") and time.time() < deadline:
            time.sleep(0.5)
        if study.user_attrs.get("grid_ready"):
            return
    for point in grid_points(dims):
        study.enqueue_trial(point, skip_if_exists=True)
    study.set_user_attr("grid_ready", True)


def _alive(pid: int) -> bool:
    """A process with this pid runs here (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:  # Linux: field 3 of /proc/<pid>/stat is the state; Z = exited, waiting for its parent to reap it
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stale(trial, now: float) -> bool:
    """A RUNNING trial whose worker is a dead process here, or whose heartbeat stopped (any host).

    A live worker beats every HEARTBEAT_S however long its trial trains, so the heartbeat also covers a pid
    reused by another process here.
    """
    if abs((datetime.now() - trial.datetime_start).total_seconds()) < CLAIM_GRACE_S:
        return False  # just claimed (Optuna stamps datetime_start with the claimer's local time)
    host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return True
    beat = trial.user_attrs.get("heartbeat") or trial.datetime_start.timestamp()
    return now - beat > STALE_S


def grace_left(study) -> float:
    """Seconds to wait before a RUNNING trial of a dead local worker can be recovered (0: there is none).

    A worker re-run right after a kill finds the killed trial inside its claim grace: it must wait and take
    it back rather than finish the sweep around it.
    """
    from optuna.trial import TrialState

    waits = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            age = abs((datetime.now() - t.datetime_start).total_seconds())
            waits.append(max(CLAIM_GRACE_S - age, 0.1))  # past the grace: recovered on the next pass
    return max(waits, default=0.0)


def recover_stale(study, storage) -> list[int]:
    """Trials left RUNNING by dead workers back to WAITING (same number, params, run dir); their numbers."""
    from optuna.trial import TrialState

    now, back = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _stale(t, now):
            continue
        # Re-read: a trial another worker recovered and claimed meanwhile has a new start time or worker.
        fresh = storage.get_trial(t._trial_id)
        same = fresh.datetime_start == t.datetime_start and fresh.user_attrs.get(
            "worker"
        ) == t.user_attrs.get("worker")
        if fresh.state == TrialState.RUNNING and same:
            storage.set_trial_state_values(t._trial_id, TrialState.WAITING)
            back.append(t.number)
    return back


def counted(study) -> int:
    """Trials that use the search budget: all but those a worker gave up as over budget."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("over_budget"))


def claim(study, storage, budget: int | None):
    """The next trial for this worker: a WAITING one (grid point or recovered), else a new one within `budget`
    (None: a grid, no new trials); None when there is nothing left."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        # Study.ask() would pop a waiting trial too, but create a new one when another worker took the last
        # point first; for a grid that would be a duplicate, so the pop is done here (as Optuna does it).
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                storage.set_trial_user_attr(t._trial_id, "worker", worker_id())  # the old one may be dead
                return optuna.trial.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    if budget is None or counted(study) >= budget:
        return None
    trial = study.ask()
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
    if sum(1 for t in before if not t.user_attrs.get("over_budget")) >= budget:
        # another worker asked at the same moment and this one came last: give it back, budget spent
        trial.set_user_attr("over_budget", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


def stamp(trial, run_dir: Path) -> None:
    """Record who runs the trial, where, and that it is alive."""
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("heartbeat", time.time())
