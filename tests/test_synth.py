"""synth: parsing generator output, every filter, resuming, remote endpoints (chunking: test_documents.py)."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fake_openai import FakeChatServer
from tests.test_documents import DOC
from tunesmith import cli
from tunesmith.config import SynthConfig, UserError, load_config
from tunesmith.data.documents import Chunk, word_spans
from tunesmith.synth.generators import conversation
from tunesmith.synth.pairs import Questions, drop_cut_line, grounding, parse_pairs, verdict
from tunesmith.synth.run import output_paths, synth, synth_cli


class Scripted:
    """A generator that answers from the passage it is given: one pair per sentence (grounded by design).

    `fail_after` raises after that many complete() calls (an interrupted run); `replies` overrides the
    output of the first calls, one reply per call (e.g. malformed text)."""

    name = "scripted"

    def __init__(self, fail_after: int | None = None, replies: list[str] | None = None):
        self.calls, self.fail_after, self.replies = 0, fail_after, list(replies or [])

    def spans(self, text: str) -> list[tuple[int, int]]:
        return word_spans(text)

    def complete(self, conversations: list[list[dict]], attempt: int) -> list[str]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("generator went away")
        self.calls += 1
        if self.replies:
            return [self.replies.pop(0) for _ in conversations]
        return [json.dumps(pairs_for(c[-1]["content"])) for c in conversations]


def pairs_for(prompt: str) -> list[dict]:
    passage = prompt.split('"""')[1].strip()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", passage) if len(s.split()) >= 3]
    # the same generic question first for every chunk: kept once, then a duplicate (same side) or leakage
    # (other)
    generic = (
        [{"question": "What is this part of the manual about?", "answer": sentences[0]}] if sentences else []
    )
    return generic + [
        {"question": f"What does the manual say about {' '.join(s.split()[:5])}?", "answer": s}
        for s in sentences
    ]


@pytest.mark.parametrize(
    "text",
    [
        '[{"question": "Who?", "answer": "Ada."}, {"question": "When?", "answer": "1843."}]',
        'Here you go:\n```json\n[{"question": "Who?", "answer": "Ada."}, '
        '{"question": "When?", "answer": "1843."}]\n```\nDone.',
        '{"pairs": [{"Question": "Who?", "Answer": "Ada."}, {"q": "When?", "a": "1843."}]}',
        # cut off
        '[{"question": "Who?", "answer": "Ada."}, {"question": "When?", "answer": "1843."}, {"question": "Wh',
        "1. Q: Who?\nA: Ada.\n\n2. Q: When?\nA: 1843.",
        "**Question 1:** Who?\n**Answer:** Ada.\nQuestion 2: When?\nAnswer: 1843.",
    ],
)
def test_parse_good_output_in_every_shape(text):
    assert parse_pairs(text) == [
        {"question": "Who?", "answer": "Ada."},
        {"question": "When?", "answer": "1843."},
    ]


def test_parse_single_object_multiline_answer_and_malformed():
    assert parse_pairs('{"question": "Who?", "answer": "Ada."}') == [{"question": "Who?", "answer": "Ada."}]
    assert parse_pairs("Q: Who wrote it?\nA: Ada\nLovelace.") == [
        {"question": "Who wrote it?", "answer": "Ada Lovelace."}
    ]
    # output cut short after a marker: the dangling "Q" is not part of the answer; a cut last line is dropped
    assert parse_pairs("Q: Who wrote it?\nA: Ada.\nQ") == [{"question": "Who wrote it?", "answer": "Ada."}]
    assert parse_pairs(drop_cut_line("Q: Who?\nA: Ada.\nQ: When?\nA: In 18")) == [
        {"question": "Who?", "answer": "Ada."}
    ]
    for bad in ["I cannot help with that.", "[]", '{"note": "nothing"}', '[{"question": "Who?"}]', ""]:
        assert parse_pairs(bad) is None, bad


def test_grounding_is_the_share_of_answer_content_words_in_the_chunk():
    chunk = "A user error prints one line. The exit code is 2."
    # content words: exit, code, 2 -> all three in the chunk
    assert grounding("The exit code is 2.", chunk) == 1.0
    # content words: exit, code, 3 -> 2 of 3
    assert grounding("The exit code is 3.", chunk) == pytest.approx(2 / 3)
    assert grounding("It is.", chunk) == 0.0  # no content words: nothing to ground


def test_every_filter():
    s = SynthConfig(min_grounding=0.6, min_answer_chars=5, max_answer_chars=40)
    chunk = Chunk("d.md#0", "d.md", "Errors", "A user error prints one line. The exit code is 2.")
    mine, other = Questions(), Questions()
    mine.add("What is the exit code of a user error?")
    other.add("How many lines does a user error print?")

    def v(q, a):
        return verdict({"question": q, "answer": a}, chunk, s, mine, other)

    assert v("What does a user error print?", "One line.") == "kept"
    assert v("Exit code?", "2.") == "length"  # 2 chars < 5
    assert v("[1]", "The exit code is 2.") == "length"  # one content word: the question names no subject
    assert v("What does it print?", "A user error prints one line " * 3) == "length"  # > 40 chars
    assert v("Which exit code?", "The exit code is 7 or 9.") == "grounding"  # exit, code, 7, 9: 2/4 < 0.6
    assert (
        v("How does a user error print one line?", "A user error prints one line.") == "kept"
    )  # "prints" is new
    assert v("How does a user error print one line?", "A user error print one line.") == "echo"  # nothing new
    assert (
        v("What is the exit code of a user error ?", "The exit code is 2.") == "duplicate"
    )  # same after normalizing
    assert v("So what is the exit code of a user error?", "The exit code is 2.") == "duplicate"  # Jaccard 6/7
    assert v("How many lines does a user error print out?", "One line.") == "leakage"  # near a test question
    q = Questions()
    q.add("How do I install tunesmith from source?")
    assert q.near("How do I install tunesmith from source code?")  # Jaccard 5/6 >= 0.8
    assert not q.near("How do I run the tests?")


def _cfg(tmp_path, *over):
    return load_config(
        None,
        [
            "synth.pairs_per_chunk=3",
            "synth.chunk_tokens=20",
            "synth.overlap_tokens=4",
            "synth.test_size=0.3",
            "synth.min_grounding=0.5",
            *over,
        ],
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_synth_writes_provenance_sides_and_report(tmp_path):
    (tmp_path / "guide.md").write_text(DOC)
    out = tmp_path / "qa.jsonl"
    report = synth(_cfg(tmp_path), [tmp_path / "guide.md"], out, generator=Scripted())
    files = output_paths(out)
    train, test = _rows(files["train"]), _rows(files["test"])
    assert report["chunks"] == report["chunks_processed"] == len(_rows(files["done"])) > 3
    assert report["kept"] == {"train": len(train), "test": len(test)} and train and test
    assert report["pairs_generated"] == len(train) + len(test) + sum(
        v for k, v in report["dropped"].items() if k != "malformed"
    )
    assert all(set(r) == {"question", "answer", "source", "chunk", "generator"} for r in train + test)
    assert {r["generator"] for r in train} == {"scripted"} and {r["source"] for r in train} == {"guide.md"}
    assert not {r["chunk"] for r in train} & {r["chunk"] for r in test}  # a chunk's pairs stay on one side
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    # overlapping windows repeat sentences: those questions are dropped as duplicates (or leakage), with
    # examples
    assert report["dropped"]["duplicate"] + report["dropped"]["leakage"] > 0
    assert json.loads(files["report"].read_text()) == report
    rejected = _rows(files["rejected"])  # every generated pair is kept or written here with its reason
    assert len(rejected) == report["pairs_generated"] - len(train) - len(test)
    assert Counter(r["reason"] for r in rejected) == {k: v for k, v in report["dropped"].items() if v}
    assert {r["source"] for r in rejected} == {"guide.md"} and all(
        r["chunk"] and r["question"] for r in rejected
    )
    # the output is a qa file the data pipeline reads
    from tunesmith.data.pipeline import read_examples
    from tunesmith.data.rejects import Rejects

    assert len(read_examples(str(out), load_config(None, []).data, Rejects())) == len(train)


def test_malformed_output_is_retried_then_counted(tmp_path):
    (tmp_path / "a.txt").write_text("The exit code of a user error is 2. It prints one line.")
    good = json.dumps(
        [{"question": "What is the exit code of a user error?", "answer": "The exit code is 2."}]
    )
    gen = Scripted(replies=["Sorry, I cannot.", good])
    report = synth(
        _cfg(tmp_path, "synth.max_retries=2"), [tmp_path / "a.txt"], tmp_path / "qa.jsonl", generator=gen
    )
    assert (report["requests"], report["retried"], report["dropped"]["malformed"]) == (2, 1, 0)
    assert report["kept"]["train"] + report["kept"]["test"] == 1
    gen = Scripted(replies=["no", "still no"])
    with pytest.raises(
        UserError,
        match=r"^synth: 0 of 0 generated pairs kept, so no qa2.jsonl was written "
        r"\(dropped: malformed 1 chunk",
    ):
        synth(
            _cfg(tmp_path, "synth.max_retries=1"), [tmp_path / "a.txt"], tmp_path / "qa2.jsonl", generator=gen
        )
    files = output_paths(tmp_path / "qa2.jsonl")
    report = json.loads(files["report"].read_text())
    assert report["dropped"]["malformed"] == 1 and report["examples"]["malformed"][0]["output"] == "still no"
    assert [(r["reason"], r["output"]) for r in _rows(files["rejected"])] == [("malformed", "still no")]


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    (tmp_path / "guide.md").write_text(DOC)
    cfg = _cfg(tmp_path, "generate.batch_size=2", "synth.concurrency=1")  # rounds of 2 chunks
    clean = synth(cfg, [tmp_path / "guide.md"], tmp_path / "clean.jsonl", generator=Scripted())
    out = tmp_path / "qa.jsonl"
    with pytest.raises(RuntimeError, match="went away"):
        synth(cfg, [tmp_path / "guide.md"], out, generator=Scripted(fail_after=2))
    first = _rows(output_paths(out)["done"])
    assert len(first) == 4 < clean["chunks"]  # two rounds of two chunks were written
    again = synth(cfg, [tmp_path / "guide.md"], out, generator=Scripted())
    assert again["chunks_done_before"] == 4 and again["chunks_processed"] == clean["chunks"] - 4
    done = [r["chunk"] for r in _rows(output_paths(out)["done"])]
    assert len(done) == len(set(done)) == clean["chunks"]
    for side in ("train", "test"):
        assert _rows(output_paths(out)[side]) == _rows(output_paths(tmp_path / "clean.jsonl")[side])
    # a third run has nothing to do; a cut-off last line (a kill mid-write) is trimmed, not parsed
    with output_paths(out)["train"].open("a") as f:
        f.write('{"question": "half a li')
    third = synth(cfg, [tmp_path / "guide.md"], out, generator=Scripted(fail_after=0))
    assert third["chunks_processed"] == 0
    assert _rows(output_paths(out)["train"]) == _rows(output_paths(tmp_path / "clean.jsonl")["train"])


def _chat_server(replies: list[tuple[int, str]]) -> FakeChatServer:
    """Scripted (status, content) replies first, then well-formed pairs for the chunk in the last message."""
    replies = list(replies)
    return FakeChatServer(
        lambda body: (
            replies.pop(0) if replies else (200, json.dumps(pairs_for(body["messages"][-1]["content"])))
        )
    )


def test_remote_generator_against_a_local_http_server(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text(
        "# Errors\nThe exit code of a user error is 2. A user error prints one line.\n"
    )
    monkeypatch.setenv("SYNTH_KEY", "sk-test")
    server = _chat_server([(500, "overloaded"), (200, "I am not sure what you mean.")])  # then good replies
    try:
        cfg = _cfg(
            tmp_path,
            f"synth.base_url={server.url}",
            "synth.model=gen-1",
            "synth.api_key_env=SYNTH_KEY",
            "synth.concurrency=2",
            "synth.max_retries=2",
            "synth.test_size=0",
        )
        report = synth(cfg, [tmp_path / "a.md"], tmp_path / "qa.jsonl")
    finally:
        server.close()
    first = server.requests[0]
    path, auth, body = first["path"], first["auth"], first["body"]
    assert (path, auth, body["model"]) == ("/v1/chat/completions", "Bearer sk-test", "gen-1")
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert "exit code" in body["messages"][-1]["content"]
    assert len(server.requests) == 3  # 500 -> HTTP retry; malformed -> a second attempt; then good
    assert report["retried"] == 1 and report["dropped"]["malformed"] == 0
    assert server.requests[2]["body"]["temperature"] >= 0.7  # the retry samples
    rows = _rows(tmp_path / "qa.jsonl")
    assert len(rows) == 3 and {r["generator"] for r in rows} == {"gen-1"}


def _ungrounded(body: dict) -> tuple[int, str]:
    """Two fluent pairs per chunk whose answers share no content word with any passage."""
    chunk = body["messages"][-1]["content"].split('"""')[1].split()[0]
    return 200, json.dumps(
        [
            {"question": f"Which planet does {chunk} orbit?", "answer": "Zebras juggle violet saxophones."},
            {"question": f"Who painted the {chunk} mural?", "answer": "Penguins paint glaciers nightly."},
        ]
    )


def test_nothing_kept_is_an_error_that_names_the_filters_and_keeps_the_rejected_pairs(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "guide.md").write_text(DOC)
    out = tmp_path / "qa.jsonl"
    server = FakeChatServer(_ungrounded)
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapped paths in what is printed
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "tunesmith",
            "synth",
            str(tmp_path / "guide.md"),
            "--out",
            str(out),
            "--set",
            f"synth.base_url={server.url}",
            "--set",
            "synth.model=m",
            "--set",
            "synth.chunk_tokens=20",
            "--set",
            "synth.overlap_tokens=4",
            "--set",
            "synth.test_size=0.3",
        ],
    )
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        server.close()
    printed = capsys.readouterr()
    files = output_paths(out)
    report = json.loads(files["report"].read_text())
    n = report["pairs_generated"]
    assert e.value.code == 2 and n == 2 * report["chunks"] > 2 and report["dropped"]["grounding"] == n
    assert printed.err.startswith(
        f"error: synth: 0 of {n} generated pairs kept, so no qa.jsonl was written (dropped: grounding {n}; "
    )
    assert len(printed.err.strip().splitlines()) == 1 and str(files["rejected"]) in printed.err
    assert not files["train"].exists() and not files["test"].exists()
    # every generated pair is on disk with its chunk, source and reason
    asked = [json.loads(_ungrounded(r["body"])[1]) for r in server.requests]
    rejected = _rows(files["rejected"])
    assert sorted((r["question"], r["answer"]) for r in rejected) == sorted(
        (p["question"], p["answer"]) for a in asked for p in a
    )
    assert all(
        r["reason"] == "grounding" and r["source"] == "guide.md" and r["chunk"].startswith("guide.md#")
        for r in rejected
    )
    # no path that does not exist is printed
    paths = re.findall(re.escape(str(tmp_path)) + r"[^\s,;:)]*", printed.out + printed.err)
    assert paths and all(Path(p).exists() for p in paths), paths
    # a second run (other filters, same --out) has no chunk left to ask: the error says how to ask again
    with pytest.raises(
        UserError,
        match=f"chunks were done by an earlier run: delete {re.escape(str(files['done']))} to ask again",
    ):
        synth(_cfg(tmp_path), [tmp_path / "guide.md"], out, generator=Scripted())


def test_a_side_that_keeps_nothing_is_printed_without_a_path(tmp_path):
    from rich.console import Console

    (tmp_path / "guide.md").write_text(DOC)
    out = tmp_path / "qa.jsonl"
    console = Console(record=True, width=1000)
    report = synth_cli(
        _cfg(tmp_path, "synth.test_size=0"), [tmp_path / "guide.md"], out, console, generator=Scripted()
    )
    files = output_paths(out)
    assert report["kept"]["train"] > 0 == report["kept"]["test"] and not files["test"].exists()
    line = console.export_text().strip().splitlines()[-1]
    assert line == (
        f"kept {report['kept']['train']} train pairs -> {out}, 0 test pairs (none kept: no file), "
        f"dropped pairs -> {files['rejected']} (report: {files['report']})"
    )
    assert set(report["files"]) == {"train", "rejected", "done", "report"}


def test_remote_configuration_errors(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text("# A\nsome words here.\n")
    with pytest.raises(UserError, match="synth.model"):
        synth(
            _cfg(tmp_path, "synth.base_url=http://127.0.0.1:9/v1"), [tmp_path / "a.md"], tmp_path / "qa.jsonl"
        )
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="NO_SUCH_KEY"):
        synth(
            _cfg(
                tmp_path,
                "synth.base_url=http://127.0.0.1:9/v1",
                "synth.model=m",
                "synth.api_key_env=NO_SUCH_KEY",
            ),
            [tmp_path / "a.md"],
            tmp_path / "qa.jsonl",
        )
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot connect"):
        synth(
            _cfg(tmp_path, f"synth.base_url=http://127.0.0.1:{port}/v1", "synth.model=m"),
            [tmp_path / "a.md"],
            tmp_path / "qa.jsonl",
        )
    server = _chat_server([(404, "model 'm' not found")])
    try:
        with pytest.raises(UserError, match="answered HTTP 404"):
            synth(
                _cfg(tmp_path, f"synth.base_url={server.url}", "synth.model=m"),
                [tmp_path / "a.md"],
                tmp_path / "qa.jsonl",
            )
    finally:
        server.close()


def test_conversation_shows_a_worked_example_then_names_the_source_section_and_count():
    msgs = conversation(Chunk("docs/a.md#3", "docs/a.md", "Install > From source", "Clone it."), 2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    # the example is answered in the asked style with as many pairs as asked (up to the 3 it has)
    assert (
        parse_pairs(msgs[2]["content"]) == json.loads(msgs[2]["content"])
        and len(json.loads(msgs[2]["content"])) == 2
    )
    lines = conversation(Chunk("a#0", "a", "", "x"), 5, "lines")
    assert len(parse_pairs(lines[2]["content"])) == 3 and lines[2]["content"].startswith("Q: ")
    assert "a.md" in msgs[3]["content"] and "Install > From source" in msgs[3]["content"]
    assert (
        "Write 2 question-answer pairs" in msgs[3]["content"] and '"""\nClone it.\n"""' in msgs[3]["content"]
    )
    assert "Write 5 question-answer pairs" in lines[3]["content"] and "Q: and A: lines" in lines[3]["content"]


def test_remote_generator_against_tunesmiths_own_server(tmp_path, model_dir):
    import uvicorn

    from tunesmith.serve.app import create_app, load_models

    (tmp_path / "a.md").write_text(
        "# A\nThe exit code of a user error is 2.\n# B\nThe server binds to the loopback address.\n"
    )
    serve_cfg = load_config(None, ["generate.max_new_tokens=8"])
    app = create_app(serve_cfg, load_models(serve_cfg, {"tiny": str(model_dir)}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30  # a server that never starts fails the test instead of hanging it
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        thread.join(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        cfg = _cfg(
            tmp_path,
            f"synth.base_url=http://127.0.0.1:{port}/v1",
            "synth.model=tiny",
            "synth.max_retries=1",
            "generate.max_new_tokens=8",
        )
        with pytest.raises(UserError, match="0 of 0 generated pairs kept"):
            synth(cfg, [tmp_path / "a.md"], tmp_path / "qa.jsonl")
    finally:
        server.should_exit = True
        thread.join(10)
    report = json.loads(output_paths(tmp_path / "qa.jsonl")["report"].read_text())
    # an untrained tiny model writes no JSON: every chunk is asked twice over HTTP, then counted malformed
    assert report["chunks"] == 2 and report["requests"] == 4 and report["retried"] == 2
    assert report["dropped"]["malformed"] == 2 and len(report["examples"]["malformed"][0]["output"]) > 0


@pytest.mark.slow
def test_docs_to_model_config_end_to_end(tmp_path, model_dir):
    """configs/docs-to-model.yaml, small: synth from the repo's docs (scripted HTTP generator) -> train -> the
    tuned model's loss on the held-out generated QA is below the base model's."""
    import torch

    from tunesmith.data.pipeline import build
    from tunesmith.eval.loss import evaluate_loss
    from tunesmith.model.load import load_model, load_tokenizer
    from tunesmith.train.loop import train

    repo = Path(__file__).parent.parent
    run = tmp_path / "run"
    server = _chat_server([])
    try:
        cfg = load_config(
            repo / "configs" / "docs-to-model.yaml",
            [
                f"model.name={model_dir}",
                f"synth.base_url={server.url}",
                "synth.model=scripted",
                "synth.chunk_tokens=48",
                "synth.overlap_tokens=8",
                f"data.path={run}/qa.jsonl",
                f"data.test_path={run}/qa.test.jsonl",
                f"out_dir={run}",
                "train.max_steps=40",
                "train.lr=1e-2",
                "train.eval_every=0",
                "train.save_every=0",
                "data.max_length=128",
            ],
        )
        report = synth(cfg, [repo / "docs"], run / "qa.jsonl")
    finally:
        server.close()
    assert report["kept"]["train"] >= 10 and report["kept"]["test"] > 0
    result = train(cfg)
    tok = load_tokenizer(cfg.model)
    data = build(cfg, tok)
    base = evaluate_loss(
        load_model(cfg.model, torch.device("cpu")),
        data.test,
        4,
        128,
        tok.pad_token_id,
        True,
        torch.device("cpu"),
    )
    assert result["eval"]["loss"] < base["loss"]
