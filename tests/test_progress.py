"""A run is visible while it runs: a Rich bar on a terminal, plain periodic lines when stdout is redirected
(a log file, CI)."""

import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from tests import tiny
from tunesmith.train.log import PlainProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^step (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\d\.\d\de[-+]\d+)  ([\d,]+) tok/s"
    r"(?:  (?:~\d+ samples \(\d+ rows\)|\d+ rows), ~[\d,]+ tok/step)?  eta (\S+)$",  # what a step holds
    re.MULTILINE,
)


class Clock:
    """A clock the test advances by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(bar, total: int, log_every: int, seconds_per_step: float, clock: Clock) -> None:
    """The loop's calls: each step completes; every log_every steps (and the last) a log row comes first."""
    task = bar.add_task("train", total=total, completed=0, loss=float("nan"), lr=1e-3, tps=0.0)
    for done in range(1, total + 1):
        clock.now += seconds_per_step
        if done % log_every == 0 or done == total:
            bar.update(task, loss=10.0 / done, tps=100.0 * done)
        bar.update(task, completed=done, lr=1e-3 / done)


def test_plain_lines_at_most_one_per_interval_first_and_last_always():
    out, clock = io.StringIO(), Clock()
    # a row every step, 3 s a step, a line at most every 10 s: t=3 (first), 15, 27, 39, 51, and the last (60)
    drive(
        PlainProgress(every_s=10, out=out, clock=clock),
        total=20,
        log_every=1,
        seconds_per_step=3,
        clock=clock,
    )
    lines = out.getvalue().splitlines()
    assert [int(m.group(1)) for m in map(LINE.match, lines)] == [1, 5, 9, 13, 17, 20]
    # step 5 at t=15: loss 10/5, lr 1e-3/5, 500 tok/s, 15 s for 5 steps -> 45 s for the 15 left
    assert lines[1] == "step 5/20  loss 2.0000  lr 2.00e-04  500 tok/s  eta 45s"
    assert lines[-1].endswith("eta 0s")


def test_plain_lines_follow_log_rows_rarer_than_the_interval():
    out, clock = io.StringIO(), Clock()
    # a row every 5 steps = every 15 s > 10 s: each row gets its line, steps without a row none
    drive(
        PlainProgress(every_s=10, out=out, clock=clock),
        total=20,
        log_every=5,
        seconds_per_step=3,
        clock=clock,
    )
    lines = out.getvalue().splitlines()
    assert [int(m.group(1)) for m in map(LINE.match, lines)] == [5, 10, 15, 20]
    assert lines[0] == "step 5/20  loss 2.0000  lr 2.00e-04  500 tok/s  eta 45s"


def test_plain_eta_counts_a_resumed_segment_from_its_start():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(every_s=0, out=out, clock=clock)
    task = bar.add_task("train", total=200, completed=100, loss=float("nan"), lr=1e-3, tps=0.0)
    clock.now = 250.0  # 10 steps of this segment in 250 s: 25 s a step, 90 steps left
    bar.update(task, loss=1.5, tps=1234.4)
    bar.update(task, completed=110, lr=5e-4)
    assert out.getvalue() == "step 110/200  loss 1.5000  lr 5.00e-04  1,234 tok/s  eta 37m30s\n"


def test_terminal_gets_the_rich_bar_a_redirected_stdout_plain_lines():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    redirected = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(progress_bar(True, terminal), Progress)
    plain = progress_bar(True, redirected)
    assert isinstance(plain, PlainProgress) and plain.out is redirected.file
    off = progress_bar(False, redirected)  # other ranks: a disabled Rich bar, nothing printed
    assert isinstance(off, Progress) and off.disable


def _train_cli(tmp_path: Path, stdout, steps: int) -> subprocess.Popen:
    """`tunesmith train` on a tiny model in a child process, stdout to `stdout`, stderr piped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FORCE_TERMINAL", None)
    return subprocess.Popen(
        tiny.train_command(tmp_path, f"train.max_steps={steps}", "train.log_every=1"),
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_redirected_cli_prints_plain_lines_with_the_logged_values(tmp_path):
    child = _train_cli(tmp_path, subprocess.PIPE, steps=8)
    stdout, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr[-2000:]
    rows = {
        r["step"]: r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "train"
    }
    lines = LINE.findall(stdout)
    # the first log row and the last step always print (this run is far shorter than the 15 s between lines)
    assert lines and int(lines[0][0]) == 1 and lines[-1][:2] == ("8", "8")
    for step, total, loss, lr, tps, _ in lines:
        row = rows[int(step)]
        assert total == "8"
        assert float(loss) == pytest.approx(row["loss"], abs=5e-5)
        assert lr == f"{row['lr']:.2e}"
        assert int(tps.replace(",", "")) == round(row["tokens_per_s"])
    assert "real tok/s" not in stdout  # no Rich bar (its column) in a log file


def test_cli_on_a_terminal_draws_the_rich_bar(tmp_path):
    pty = pytest.importorskip("pty")
    leader, follower = pty.openpty()
    child = _train_cli(tmp_path, follower, steps=4)
    os.close(follower)  # the child holds its own copy: reading ends when the child exits
    shown = b""
    with os.fdopen(leader, "rb", buffering=0) as screen:
        try:
            while chunk := screen.read(65536):  # read while it runs: a full pty would block the child
                shown += chunk
        except OSError:  # EIO: the child closed the terminal and everything was read
            pass
    stderr = child.stderr.read()
    assert child.wait(timeout=600) == 0, stderr[-2000:]
    text = shown.decode(errors="replace")
    assert "real tok/s" in text and "4/4" in text  # the Rich bar's columns
    assert not LINE.search(text.replace("\r", "\n"))
