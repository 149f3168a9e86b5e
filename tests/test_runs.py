"""`tunesmith runs` and `runs compare` on real run dirs trained here: tiny models, a few steps each.

The module fixture trains, under <tmp>/runs/: `fast` (lr 3e-3, finished, compared), `sweep/slow` (lr 1e-3,
finished, compared: a nested dir), `stopped` (SIGTERM during step 2: checkpointed and exited), `diverged`
(NaN loss at step 3), `raised` (the checkpoint save at step 2 fails: disk full), `broken` (a torn manifest)
and `badyaml` (a config.yaml that is not YAML).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from tests import tiny
from tunesmith import cli
from tunesmith.config import UserError, load_config
from tunesmith.eval.compare import compare
from tunesmith.runs.compare import compare_runs
from tunesmith.runs.scan import ROW_KEYS, scan, status_of
from tunesmith.runs.table import print_runs, select
from tunesmith.train import checkpoint
from tunesmith.train import loop as loop_mod
from tunesmith.train.heartbeat import BEAT_S, Heartbeat
from tunesmith.train.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
EVAL = [
    "eval.limit=4",
    "eval.probe=3",
    "eval.max_new_tokens=8",
    "eval.batch_size=4",
    "eval.embedding_model=null",
]


def cfg_for(root: Path, model_dir: Path, data: Path, name: str, *over: str):
    base = [
        f"model.name={model_dir}",
        f"data.path={data}",
        f"out_dir={root / 'runs' / name}",
        "data.test_size=4",
        "data.max_length=64",
        "train.batch_size=4",
        "train.log_every=1",
        "train.scheduler=constant",
        "train.save_every=0",
        *EVAL,
    ]
    return load_config(None, base + list(over))


def _poison_call(mp: pytest.MonkeyPatch, n: int, action) -> None:
    """Make the n-th loss computation (one micro-batch per step: step n) run `action` on its loss."""
    calls = {"n": 0}
    real = loop_mod.loss_sum

    def patched(model, batch, smoothing):
        calls["n"] += 1
        total, count = real(model, batch, smoothing)
        return (action(total) if calls["n"] == n else total), count

    mp.setattr(loop_mod, "loss_sum", patched)


def _sigterm(total):
    os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this step, checkpoints it and exits
    return total


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model_dir, data = tiny.save_model_dir(root / "tiny-neox"), tiny.write_qa(root / "qa.jsonl")
    for name, lr, every in (("fast", "3e-3", 2), ("sweep/slow", "1e-3", 3)):
        cfg = cfg_for(
            root, model_dir, data, name, f"train.lr={lr}", "train.max_steps=6", f"train.eval_every={every}"
        )
        train(cfg)
        compare(cfg)
    with pytest.MonkeyPatch.context() as mp:
        _poison_call(mp, 2, _sigterm)
        with pytest.raises(SystemExit):
            train(cfg_for(root, model_dir, data, "stopped", "train.max_steps=6"))
    with pytest.MonkeyPatch.context() as mp:
        _poison_call(mp, 3, lambda total: total * float("nan"))
        with pytest.raises(TrainingDiverged):
            train(cfg_for(root, model_dir, data, "diverged", "train.max_steps=6", "train.max_grad_norm=null"))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", disk_full)
        with pytest.raises(OSError):
            train(cfg_for(root, model_dir, data, "raised", "train.max_steps=4", "train.save_every=2"))
    broken = root / "runs" / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"model": "x", "segm')  # cut short mid-write
    (root / "runs" / "badyaml").mkdir()
    (root / "runs" / "badyaml" / "config.yaml").write_text("train: {lr: [1e-4\n")
    return root, model_dir, data


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def test_each_run_gets_its_status_and_reason(built):
    rows = by_name(scan(built[0] / "runs"))
    assert {n: r["status"] for n, r in rows.items()} == {
        "badyaml": "unreadable",
        "broken": "unreadable",
        "diverged": "failed",
        "fast": "finished",
        "raised": "failed",
        "stopped": "interrupted",
        "sweep/slow": "finished",
    }
    assert rows["fast"]["reason"] is None
    assert rows["stopped"]["reason"].startswith("stopped by a signal at step 2")
    assert re.match(
        r"diverged at step 2: loss is nan at step 3 \(batch with .*qa\.jsonl:\d+", rows["diverged"]["reason"]
    )
    assert rows["raised"]["reason"] == "failed at step 2: OSError: [Errno 28] No space left on device"
    assert rows["broken"]["reason"].startswith("manifest.json: not valid JSON (")
    assert rows["badyaml"]["reason"].startswith("config.yaml: not valid YAML (")
    assert all(list(r) == list(ROW_KEYS) for r in rows.values())  # stable keys for scripts, in one order


def test_the_trainer_records_how_a_segment_ended(built):
    runs = built[0] / "runs"
    segments = {
        n: json.loads((runs / n / "manifest.json").read_text())["segments"] for n in ("raised", "fast")
    }
    assert segments["raised"][-1]["status"] == "failed" and segments["raised"][-1]["ended_at_step"] == 2
    assert segments["fast"][-1]["pid"] == os.getpid() and segments["fast"][-1]["host"]


def test_values_are_what_the_run_files_say(built):
    root, model_dir, _ = built
    rows = by_name(scan(root / "runs"))
    for name, lr, every in (("fast", 3e-3, 2), ("sweep/slow", 1e-3, 3)):
        run, row = root / "runs" / name, rows[name]
        logged = metrics_of(run)
        evals = [m for m in logged if m["split"] == "eval"]
        assert [m["step"] for m in evals] == list(range(every, 7, every))
        assert row["steps"] == 6 == logged[-1]["step"]
        assert row["final_eval_loss"] == evals[-1]["loss"]
        best = min(evals, key=lambda m: m["loss"])
        assert (row["best_eval_loss"], row["best_eval_step"]) == (best["loss"], best["step"])
        trains = [m for m in logged if m["split"] == "train"]
        assert row["tokens"] == trains[-1]["tokens"]
        # tokens over seconds of training steps; one step per window here (log_every=1)
        seconds = sum(
            (b["tokens"] - a) / b["tokens_per_s"] for a, b in zip([0] + [t["tokens"] for t in trains], trains)
        )
        assert row["tokens_per_s"] == pytest.approx(trains[-1]["tokens"] / seconds)
        assert (
            min(t["tokens_per_s"] for t in trains)
            <= row["tokens_per_s"]
            <= max(t["tokens_per_s"] for t in trains)
        )
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert (
            row["tuned_token_f1"] == metrics["tuned"]["token_f1"]
            and row["base_rouge_l"] == metrics["base"]["rouge_l"]
        )
        assert row["tuned_probe_recall"] == metrics["tuned"]["probe_numeric_recall"]
        manifest = json.loads((run / "manifest.json").read_text())
        assert row["data_hash"] == manifest["data_hash"] and row["model"] == str(model_dir)
        assert (row["lr"], row["max_steps"], row["batch_size"], row["grad_accum"]) == (lr, 6, 4, 1)
        assert (row["lora"], row["lora_r"], row["segments"]) == (False, None, 1)
    assert rows["fast"]["data_hash"] == rows["stopped"]["data_hash"]  # same data, same hash
    assert rows["stopped"]["steps"] == 2 and rows["stopped"]["final_eval_loss"] is None
    assert rows["diverged"]["steps"] == 2 and rows["raised"]["steps"] == 2


def test_sort_and_filter(built):
    rows = scan(built[0] / "runs")
    names = lambda rs: [r["name"] for r in rs]  # noqa: E731
    assert names(select(rows, ["status=finished"], "lr")) == ["sweep/slow", "fast"]
    assert names(select(rows, ["status=finished"], "lr", desc=True)) == ["fast", "sweep/slow"]
    assert names(select(rows, ["lr=0.003"], "name")) == ["fast"]  # a number matches as a number (3e-3)
    assert names(select(rows, ["status=fail*"], "name")) == ["diverged", "raised"]
    assert names(select(rows, ["model=*tiny-neox", "max_steps=6"], "name")) == [
        "diverged",
        "fast",
        "stopped",
        "sweep/slow",
    ]
    assert names(select(rows, [], "final_eval_loss"))[-5:] == [
        "badyaml",
        "broken",
        "diverged",
        "raised",
        "stopped",
    ]  # None last
    with pytest.raises(UserError, match="no such column"):
        select(rows, ["colour=red"], None)
    with pytest.raises(UserError, match="expected key=value"):
        select(rows, ["status"], None)


def test_table_shows_every_run_and_why(built):
    console = Console(record=True, width=250)
    print_runs(select(scan(built[0] / "runs"), [], "name"), built[0] / "runs", console)
    text = console.export_text()
    for name in ("broken", "diverged", "fast", "raised", "stopped", "sweep/slow"):
        assert name in text
    assert "broken: unreadable: manifest.json: not valid JSON" in text
    assert "raised: failed: failed at step 2: OSError" in text
    assert "lr 0.003" in text and "6 steps" in text and "full" in text


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """`tunesmith` in a fresh interpreter; prints, on stderr's last line, whether torch got imported."""
    code = (
        "import sys\nfrom tunesmith.cli import main\nsys.argv = ['tunesmith', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\nsys.exit(code)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def test_cli_json_lists_without_importing_torch(built):
    runs = built[0] / "runs"
    out = _cli("runs", str(runs), "--filter", "status=finished", "--sort", "lr", "--json")
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "no torch"
    assert json.loads(out.stdout) == select(scan(runs), ["status=finished"], "lr")
    page = runs / "cmp.html"
    out = _cli("runs", "compare", str(runs / "fast"), str(runs / "sweep" / "slow"), "--out", str(page))
    assert out.returncode == 0 and page.is_file(), out.stderr
    assert out.stderr.strip().splitlines()[-1] == "no torch"


def test_cli_errors_are_one_line_exit_2(built, monkeypatch, capsys):
    for argv, want in (
        (["runs", str(built[0] / "nowhere")], "no such directory"),
        (["runs", str(built[0] / "runs"), "--sort", "colour"], "runs --sort 'colour': no such column"),
        (["runs", "compare", str(built[0] / "runs" / "fast")], "give two or more run dirs"),
    ):
        monkeypatch.setattr(sys, "argv", ["tunesmith", *argv])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and want in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _cells(page: str, table_id: str) -> list[list[str]]:
    """The text of every body cell of one table of the page, row by row (tags dropped, entities decoded)."""
    table = page.split(f'<table id="{table_id}">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1], flags=re.S)
    return [
        [html.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", r, re.S)]
        for r in rows
    ]


def test_compare_page_has_the_lr_diff_metrics_and_the_answers_that_differ(built):
    runs = built[0] / "runs"
    fast, slow = runs / "fast", runs / "sweep" / "slow"
    page = compare_runs([fast, slow], runs / "page.html").read_text()
    diff = {row[0]: row[1:] for row in _cells(page, "config-diff")}
    assert diff["train.lr"] == ["0.003", "0.001"] and diff["train.eval_every"] == ["2", "3"]
    assert "train.batch_size" not in diff and "manifest.data_hash" not in diff  # equal: not shown
    metrics = {row[0]: row[1:] for row in _cells(page, "metrics")}
    tuned = [json.loads((r / "eval" / "metrics.json").read_text())["tuned"] for r in (fast, slow)]
    assert metrics["tuned.token_f1"] == [f"{m['token_f1']:.4g}" for m in tuned]
    preds = [
        [json.loads(x) for x in (r / "eval" / "predictions.jsonl").read_text().splitlines()]
        for r in (fast, slow)
    ]
    differ = [
        a["question"] for a, b in zip(*preds) if a["tuned"]["answer"].strip() != b["tuned"]["answer"].strip()
    ]
    assert f"{len(differ)} of {len(preds[0])} questions answered differently" in page
    if differ:
        assert [row[0] for row in _cells(page, "answers")] == differ
    else:
        assert '<table id="answers">' not in page
    assert page.count('src="data:image/png;base64,') == 1
    assert [row[0] for row in _cells(page, "runs")] == ["fast", "sweep/slow"]


def test_compare_page_escapes_what_runs_hold(built, tmp_path):
    fast = built[0] / "runs" / "fast"
    evil = tmp_path / "<evil>"
    evil.mkdir()
    shutil.copy(fast / "config.yaml", evil / "config.yaml")
    shutil.copytree(fast / "eval", evil / "eval")
    preds = [json.loads(x) for x in (evil / "eval" / "predictions.jsonl").read_text().splitlines()]
    preds[0]["tuned"]["answer"] = "<script>alert(1)</script>"
    (evil / "eval" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds) + "{torn\n")
    page = compare_runs([fast, evil], tmp_path / "page.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;evil&gt;" in page and "<evil>" not in page
    assert "predictions.jsonl: 1 unreadable line(s) left out" in page  # said, not dropped silently
    assert _cells(page, "runs")[1][1] == "unknown"  # no manifest, no checkpoint, no final/


def _wait_for_rows(path: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while not path.is_file() or len(path.read_text().splitlines()) < n:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.1)


def test_a_live_run_is_running_and_a_killed_one_failed(tmp_path, model_dir, qa_file):
    run = tmp_path / "live" / "run"
    cfg = tmp_path / "live.yaml"
    cfg.write_text(
        f"model: {{name: {model_dir}}}\ndata: {{path: {qa_file}, test_size: 4, max_length: 64}}\n"
        "train: {lr: 3.0e-3, batch_size: 4, max_steps: 100000, save_every: 0, log_every: 1}\n"
        f"out_dir: {run}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tunesmith", "train", str(cfg)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_rows(run / "metrics.jsonl", 2, proc)
        [row] = scan(tmp_path / "live")
        beat = json.loads((run / "heartbeat.json").read_text())
        assert (beat["pid"], beat["host"]) == (proc.pid, socket.gethostname())
        assert row["status"] == "running"
        assert re.fullmatch(
            rf"pid {proc.pid}, heartbeat \d+s ago \((step \d+|before its first step)\)", row["reason"]
        )
    finally:
        proc.kill()
        proc.wait(timeout=60)
    [row] = scan(tmp_path / "live")
    assert row["status"] == "failed" and row["reason"].startswith(f"process {proc.pid} ended without closing")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    whole = [json.loads(x) for x in lines if x.endswith("}")]  # a kill can cut the last line short
    assert row["steps"] == whole[-1]["step"] >= 2


# ---- live or not: the heartbeat, on run dirs made by hand (times set by hand, `now` given)

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DEAD_PID = 2**22 + 7  # above Linux's largest pid: no such process
HERE = socket.gethostname()


def _running_run(tmp_path: Path, pid: int, host: str, beat: dict | None) -> tuple[Path, dict]:
    """A run dir whose latest segment is still marked running by (pid, host), with this heartbeat.json."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    manifest = {"segments": [{"status": "running", "started_at_step": 0, "pid": pid, "host": host}]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    if beat is not None:
        (run / "heartbeat.json").write_text(json.dumps(beat))
    return run, manifest


def _beat(age: float, pid: int, host: str, step: int | None = 7, gap: float | None = None) -> dict:
    return {"time": NOW - age, "step": step, "pid": pid, "host": host, "gap_s": gap}


def test_a_fresh_heartbeat_from_another_host_is_running_a_stale_one_unknown(tmp_path):
    run, manifest = _running_run(tmp_path, 4242, "gpu-7", _beat(30, 4242, "gpu-7"))
    assert status_of(run, manifest, NOW) == ("running", "pid 4242 on gpu-7, heartbeat 30s ago (step 7)")
    (run / "heartbeat.json").write_text(json.dumps(_beat(121, 4242, "gpu-7")))  # past 2 minutes: stale
    status, reason = status_of(run, manifest, NOW)
    assert status == "unknown"
    assert reason.startswith("no heartbeat since 22:11 UTC (step 7) from pid 4242 on gpu-7: stopped without")


def test_rare_log_rows_widen_the_fresh_window_to_four_gaps(tmp_path):
    # rows 100 s apart (a slow step or log_every): fresh for 4 x 100 s, not 120 s
    run, manifest = _running_run(tmp_path, 4242, "gpu-7", _beat(399, 4242, "gpu-7", gap=100.0))
    assert status_of(run, manifest, NOW)[0] == "running"
    (run / "heartbeat.json").write_text(json.dumps(_beat(401, 4242, "gpu-7", gap=100.0)))
    assert status_of(run, manifest, NOW)[0] == "unknown"


def test_on_this_host_a_fresh_heartbeat_needs_the_pid_alive(tmp_path):
    run, manifest = _running_run(tmp_path, os.getpid(), HERE, _beat(5, os.getpid(), HERE, step=None))
    assert status_of(run, manifest, NOW) == (
        "running",
        f"pid {os.getpid()}, heartbeat 5s ago (before its first step)",
    )
    # the process died a moment after its last beat (SIGKILL): failed, not running
    dead, dead_manifest = _running_run(tmp_path / "b", DEAD_PID, HERE, _beat(5, DEAD_PID, HERE))
    status, reason = status_of(dead, dead_manifest, NOW)
    assert status == "failed" and reason.startswith(f"process {DEAD_PID} ended without closing its record")


def test_a_stale_heartbeat_with_the_pid_alive_here_is_unknown_not_running(tmp_path):
    # a recycled pid (or a hung trainer) is alive, but the run has not beaten for 10 minutes
    run, manifest = _running_run(tmp_path, os.getpid(), HERE, _beat(600, os.getpid(), HERE))
    status, reason = status_of(run, manifest, NOW)
    assert status == "unknown"
    assert reason.startswith(f"no heartbeat since 22:03 UTC (step 7) from pid {os.getpid()}: a slow step")


def test_without_a_heartbeat_of_its_own_the_segment_falls_back_to_its_pid(tmp_path):
    # a run written before heartbeats existed
    run, manifest = _running_run(tmp_path, 4242, "gpu-7", None)
    assert status_of(run, manifest, NOW) == (
        "running",
        "marked running by pid 4242 on gpu-7 (not checked from here)",
    )
    # an earlier segment's heartbeat (another pid) says nothing about this one: the pid does
    run2, manifest2 = _running_run(tmp_path / "b", os.getpid(), HERE, _beat(3600, DEAD_PID, HERE))
    assert status_of(run2, manifest2, NOW) == ("running", f"pid {os.getpid()}")
    run3, manifest3 = _running_run(tmp_path / "c", DEAD_PID, HERE, None)
    assert status_of(run3, manifest3, NOW)[0] == "failed"


def test_the_heartbeat_is_written_at_start_then_at_most_every_beat_s(tmp_path):
    clock = Clock()
    beats = Heartbeat(tmp_path, clock=clock)
    beats.start()
    read = lambda: json.loads((tmp_path / "heartbeat.json").read_text())  # noqa: E731
    assert read() == {"time": 0.0, "step": None, "pid": os.getpid(), "host": HERE, "gap_s": None}
    for step, t in ((1, 5.0), (2, 10.0), (3, BEAT_S + 1), (4, BEAT_S + 3), (5, BEAT_S + 40)):
        clock.now = t
        beats.beat(step)
        if step == 2:
            assert read()["time"] == 0.0  # 10 s after the last write: not yet
    assert read() == {"time": BEAT_S + 40, "step": 5, "pid": os.getpid(), "host": HERE, "gap_s": 37.0}
    assert not (tmp_path / "heartbeat.json.tmp").exists()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_closed_segment_leaves_no_heartbeat(built):
    runs = built[0] / "runs"
    for name in ("fast", "stopped", "diverged", "raised"):
        assert (runs / name / "manifest.json").is_file() and not (runs / name / "heartbeat.json").exists()
