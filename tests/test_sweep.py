"""`tunesmith sweep` on tiny models: grid and search trials are ordinary run dirs, the study survives a
killed sweep, workers sharing one SQLite study never run a point twice, pruning stops a trial the way the
trainer stops cleanly, and the outputs say what each run measured."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunesmith import cli
from tunesmith.config import load_config
from tunesmith.sweep import report
from tunesmith.sweep import study as studies
from tunesmith.sweep.space import grid_points, override, split_args

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def _config(tmp_path: Path, model_dir: Path, data: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""
model: {{name: {model_dir}}}
data: {{path: {data}, test_size: 4, max_length: 64}}
train: {{lr: 3.0e-3, batch_size: 4, max_steps: 2, eval_every: 1, save_every: 1, log_every: 1}}
sweep: {{out_dir: {tmp_path / "sw"}}}
""")
    return path


def _sweep(cfg: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "sweep", str(cfg), *args],
        env=ENV,
        cwd=cfg.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _last_eval_loss(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "eval"][-1]


def _study(sweep_dir: Path):
    return optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


@pytest.mark.slow
def test_grid_with_two_workers_trains_each_point_once_and_tables_its_metric(tmp_path, model_dir, qa_file):
    cfg = _config(tmp_path, model_dir, qa_file)
    proc = _sweep(cfg, "--grid", "train.lr=1e-3,3e-3", "lora.r=2,4", "lora.dropout=0.0", "--workers", "2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    sw = tmp_path / "sw"
    assert (sw / "worker-1.log").exists()  # the second worker, a process of its own
    assert sorted(p.name for p in sw.glob("trial-*")) == ["trial-0", "trial-1", "trial-2", "trial-3"]
    trials = _study(sw).get_trials()
    points = {(t.params["train.lr"], t.params["lora.r"]) for t in trials}
    assert len(trials) == 4 and points == {(1e-3, 2), (1e-3, 4), (3e-3, 2), (3e-3, 4)}  # no point twice
    assert all(t.state.name == "COMPLETE" for t in trials)
    rows = [json.loads(x) for x in (sw / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:  # each table entry is what that run dir's trainer logged as its last eval
        run = Path(row["run_dir"])
        assert row["eval_loss"] == _last_eval_loss(run)
        assert load_config(run / "config.yaml").train.lr == row["params"]["train.lr"]
        assert load_config(run / "config.yaml").lora.r == row["params"]["lora.r"]
    assert len((sw / "results.csv").read_text().splitlines()) == 5
    assert (sw / "plot-train.lr.png").stat().st_size > 0 and (sw / "plot-lora.r.png").stat().st_size > 0
    best_row = min(rows, key=lambda r: r["eval_loss"])
    best = load_config(sw / "best.yaml")
    assert (best.train.lr, best.lora.r) == (best_row["params"]["train.lr"], best_row["params"]["lora.r"])
    assert best.lora.dropout == 0.0 and best.out_dir == best_row["run_dir"]  # the shared override is kept


@pytest.mark.slow
def test_a_grid_on_a_compare_metric_runs_compare_per_trial_and_keeps_the_max(tmp_path, model_dir, qa_file):
    cfg = _config(tmp_path, model_dir, qa_file)
    # lr 1e-5 leaves the tiny model saying nothing useful; 1e-2 for 20 steps teaches it the answers' words
    shared = ["train.max_steps=20", "train.eval_every=0", "train.save_every=0", "sweep.metric=token_f1"]
    shared += ["eval.systems=[tuned]", "eval.limit=4", "eval.probe=0", "eval.max_new_tokens=8"]
    shared += ["eval.embedding_model=null"]
    proc = _sweep(cfg, "--grid", "train.lr=1e-5,1e-2", *shared)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    sw = tmp_path / "sw"
    assert _study(sw).direction.name == "MAXIMIZE"  # sweep.direction=auto: token F1 is better higher
    rows = {
        r["params"]["train.lr"]: r for r in map(json.loads, (sw / "results.jsonl").read_text().splitlines())
    }
    for row in rows.values():  # each trial's value is what its own compare wrote for the tuned model
        metrics = json.loads((Path(row["run_dir"]) / "eval" / "metrics.json").read_text())
        assert row["status"] == "complete" and row["token_f1"] == metrics["tuned"]["token_f1"]
    # the two points differ, so picking the min instead of the max would fail here
    assert rows[1e-2]["token_f1"] > rows[1e-5]["token_f1"]
    best = load_config(sw / "best.yaml")
    assert best.train.lr == 1e-2 and best.out_dir == rows[1e-2]["run_dir"]


@pytest.mark.slow
def test_killed_search_resumes_and_spends_exactly_the_budget(tmp_path, model_dir, qa_file):
    cfg = _config(tmp_path, model_dir, qa_file)
    args = ["--search", "train.lr=log:1e-4:1e-2", "lora.r=int:2:8", "train.scheduler=cat:cosine,linear"]
    args += ["--trials", "3"]
    proc = _sweep(cfg, *args)
    seen = []
    for line in proc.stdout:  # kill once trial 0 is done and trial 1 has started
        seen.append(line)
        if line.startswith("trial 1:"):
            break
    assert any(x.startswith("trial 0: complete") for x in seen), "".join(seen)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sw = tmp_path / "sw"
    before = {t.number: (t.state.name, t.params) for t in _study(sw).get_trials()}
    assert before[0][0] == "COMPLETE" and before[1][0] == "RUNNING" and len(before) == 2

    resumed = _sweep(cfg, *args)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    after = _study(sw).get_trials()
    assert [t.number for t in after] == [0, 1, 2]  # the budget, no trial added for the one interrupted
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in after)
    assert after[1].params == before[1][1]  # the interrupted trial ran again with its own point, in its dir
    assert sorted(p.name for p in sw.glob("trial-*")) == ["trial-0", "trial-1", "trial-2"]
    assert len((sw / "results.jsonl").read_text().splitlines()) == 3


_CLAIMER = """
import os, sys, time
from pathlib import Path
from tunesmith.sweep import study as st
from tunesmith.sweep.space import split_args
here = Path(sys.argv[1])
storage = st.storage_for(None, here)
dims, _ = split_args(["a.x=" + ",".join(str(i) for i in range(40))], False)
study = st.open_study(storage, "race", "minimize", {"k": 1}, dims, grid=True)
(here / f"ready-{os.getpid()}").touch()
while len(list(here.glob("ready-*"))) < 2:  # both start claiming at the same instant
    time.sleep(0.001)
got = []
while (trial := st.claim(study, storage, None)) is not None:
    got.append(trial.number)
    study.tell(trial, 0.0)
print(" ".join(map(str, got)))
"""


def test_two_workers_sharing_one_sqlite_study_never_claim_a_point_twice(tmp_path):
    # Both claim as fast as they can from the same instant; a claim that read WAITING outside the
    # write lock would let both run a point (seen without BEGIN IMMEDIATE: duplicates or a crashed tell).
    script = tmp_path / "claimer.py"
    script.write_text(_CLAIMER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=ENV, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    claimed = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        claimed.append([int(x) for x in out.split()])
    assert sorted(claimed[0] + claimed[1]) == list(range(40))


def test_a_trial_of_a_dead_worker_goes_back_to_the_queue_with_its_number(tmp_path, monkeypatch):
    storage = studies.storage_for(None, tmp_path)
    dims, _ = split_args(["train.lr=1e-4,3e-4"], False)
    study = studies.open_study(storage, "s", "minimize", {}, dims, grid=True)
    dead, alive = studies.claim(study, storage, None), studies.claim(study, storage, None)
    dead.set_user_attr("worker", f"{studies.worker_id().rpartition(':')[0]}:{2**22 + 7}")  # no such pid
    alive.set_user_attr("worker", studies.worker_id())
    for t in (dead, alive):
        t.set_user_attr("heartbeat", time.time())
    assert studies.recover_stale(study, storage) == []  # claimed a moment ago: its worker is stamping it
    monkeypatch.setattr(studies, "CLAIM_GRACE_S", 0.0)  # rather than wait until the claims are 10 s old
    assert studies.recover_stale(study, storage) == [dead.number]
    again = studies.claim(study, storage, None)
    assert again.number == dead.number and studies.claim(study, storage, None) is None


def test_search_budget_counts_every_trial(tmp_path):
    storage = studies.storage_for(None, tmp_path)
    study = studies.open_study(storage, "s", "minimize", {}, [], grid=False)
    got = [studies.claim(study, storage, 2) for _ in range(3)]
    assert [t.number for t in got[:2]] == [0, 1] and got[2] is None


def test_split_args_tells_swept_keys_from_overrides():
    dims, over = split_args(
        [
            "train.lr=1e-4,3e-4",
            "lora.r=int:4:64",
            "train.max_steps=20",
            "train.report_to=[tensorboard,mlflow]",
        ],
        search=True,
    )
    assert [(d.key, d.kind) for d in dims] == [("train.lr", "values"), ("lora.r", "int")]
    assert dims[0].values == (1e-4, 3e-4) and (dims[1].low, dims[1].high) == (4, 64)
    assert over == ["train.max_steps=20", "train.report_to=[tensorboard,mlflow]"]
    assert grid_points(split_args(["a=1,2", "b=x,y"], False)[0]) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]


def test_a_point_reaches_the_trainer_as_the_value_it_is():
    # PyYAML reads "1e-05" as a string; the override the trainer gets must load back as the float.
    cfg = load_config(None, [override("train.lr", 1e-5), override("train.scheduler", "linear")])
    assert cfg.train.lr == 1e-5 and cfg.train.scheduler == "linear"
    assert load_config(None, [override("out_dir", "a: b")]).out_dir == "a: b"


@pytest.mark.parametrize(
    "args, start",
    [
        (["--grid", "train.lr=log:1e-5:1e-3"], "error: sweep: train.lr=log:1e-5:1e-3: --grid takes"),
        (["--search", "train.lr=log:1e-5"], "error: sweep: train.lr=log:1e-5: a range looks like"),
        (["--search", "train.lr=log:0:1e-3"], "error: sweep: train.lr=log:0:1e-3: a log range needs"),
        (["--search", "lora.r=int:64:4"], "error: sweep: lora.r=int:64:4: LOW must be below HIGH"),
        (["--grid", "train.lr=1e-4,"], "error: sweep: train.lr=1e-4,: every value"),
        (["--grid", "train.lr=1e-4"], "error: sweep: --grid needs at least one swept key"),
        (["--grid", "--search", "train.lr=1,2"], "error: sweep: give exactly one of --grid or --search"),
        (
            ["--grid", "train.lrr=1e-4,3e-4"],
            "error: {cfg}: unknown key 'train.lrr' — did you mean 'train.lr'?",
        ),
        (["--grid", "train.lr=-1,1e-4"], "error: {cfg}: train.lr"),
    ],
)
def test_bad_sweep_syntax_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, start):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sweep: {{out_dir: {tmp_path / 'sw'}}}\n")
    monkeypatch.setattr(sys, "argv", ["tunesmith", "sweep", str(cfg), *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(start.format(cfg=cfg)), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "sw").exists()  # refused before any trial


def test_data_limit_grid_draws_the_labelled_data_scaling_curve(tmp_path):
    dims, _ = split_args(["data.limit=50,100,200,400"], False)
    rows = [
        {"trial": i, "status": "complete", "params": {"data.limit": n}, "eval_loss": loss, "run_dir": None}
        for i, (n, loss) in enumerate([(50, 3.0), (100, 2.5), (200, 2.2), (400, 2.1)])
    ]
    labels = report.plot_key(rows, dims[0], "eval_loss", True, tmp_path / "plot.png")
    assert labels == {
        "xlabel": "training examples (data.limit)",
        "ylabel": "eval_loss",
        "title": "data-scaling curve",
    }
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert report.plot_key([], dims[0], "eval_loss", True, tmp_path / "none.png") is None


@pytest.mark.slow
def test_a_trial_worse_than_the_median_is_pruned_by_sigterm_and_saved(tmp_path, model_dir, qa_file):
    from tunesmith.sweep import trial as trials

    storage = studies.storage_for(None, tmp_path)
    study = studies.open_study(storage, "s", "minimize", {}, [], grid=False)
    for _ in range(2):  # two finished trials whose eval loss was 0.1 at every step: any real loss is worse
        study.add_trial(
            optuna.trial.create_trial(value=0.1, intermediate_values={s: 0.1 for s in range(1, 1001)})
        )
    trial = studies.claim(study, storage, 3)
    run = tmp_path / "run"
    argv = ["train", str(_config(tmp_path, model_dir, qa_file)), f"out_dir={run}", "train.max_steps=1000"]
    proc = trials.launch(argv, tmp_path / "trial.log")
    assert trials.follow(trial, proc, run, "loss", prune=True)
    assert proc.returncode == 128 + signal.SIGTERM  # the trainer's own clean stop
    assert trials.outcome(proc.returncode, True, tmp_path / "trial.log").status == "pruned"
    assert not (run / "final").exists() and list((run / "checkpoints").iterdir())  # stopped, saved
    reported = storage.get_trial(trial._trial_id).intermediate_values
    assert reported and all(v == _evals(run)[s] for s, v in reported.items())


def _evals(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "eval"}


def test_a_trial_reports_the_last_eval_row_or_its_compare_metric(tmp_path):
    from tunesmith.sweep.trial import final_value

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    rows = [
        {"step": 1, "split": "eval", "loss": 3.0, "perplexity": 20.0},
        {"step": 2, "split": "train", "loss": 1.0},
        {"step": 2, "split": "eval", "loss": 2.5, "perplexity": 12.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "spl')
    assert final_value(run, "eval_loss") == (2.5, "")  # the last complete eval row, not the cut-off line
    assert final_value(run, "eval_ppl") == (12.0, "")
    metrics = {"base": {"token_f1": 0.25}, "tuned": {"token_f1": 0.5}}
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert final_value(run, "token_f1") == (0.5, "") and final_value(run, "base.token_f1") == (0.25, "")
    value, why = final_value(run, "rouge_l")
    assert value is None and "no numeric 'rouge_l' under 'tuned'" in why
