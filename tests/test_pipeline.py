"""pipeline.build end to end (bad rows of every kind, mapping, dedupe, test_path, limit, cache); inspect."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console

from tests.test_sources import no_network
from tunesmith.config import UserError, load_config
from tunesmith.data.inspect import highlight, inspect_data, print_inspect
from tunesmith.data.pipeline import build, prepare
from tunesmith.data.render import IGNORE

GOOD = b'{"question": "What was the revenue?", "answer": "The revenue was 42 percent."}'
# (line 2 of a file whose line 1 is GOOD, field, cause)
BAD_ROWS = [
    (b'{"question": "What was the revenue?"}', "answer", "missing field 'answer'"),
    (b'{"question": "What was the revenue?", "answer": ""}', "answer", "field 'answer' is empty"),
    (b'{"question": " \\t\\n", "answer": "x"}', "question", "field 'question' is empty"),
    (
        b'{"question": "What was the revenue?", "answer": 42}',
        "answer",
        "field 'answer' must be a string (got int)",
    ),
    (b'{"question": "What was the revenue?", "answer": null}', "answer", "missing field 'answer'"),
    (b'{"question": "What was", "answer" "x"}', None, "invalid JSON (Expecting ':' delimiter at column 35)"),
    (b'"just a string"', None, "row is not a JSON object (got str)"),
    (
        b'{"question": "caf\xe9?", "answer": "x"}',
        None,
        "invalid UTF-8 (byte 0xe9 at column 18, file offset {offset})",
    ),
]


def cfg_for(path, out, *over):
    return load_config(None, [f"data.path={path}", f"out_dir={out}", *over])


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n):
    return [
        {"question": f"What was the revenue of company {i}?", "answer": f"It was {i} million."}
        for i in range(n)
    ]


def test_build_renders_both_splits_with_masks(tok, tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", qa_rows(10))
    p = build(cfg_for(f, tmp_path / "run", "data.test_size=2"), tok, None)
    assert (len(p.train), len(p.test), len(p.train_examples), len(p.test_examples), p.rejected) == (
        8,
        2,
        8,
        2,
        0,
    )
    assert sorted(s["where"] for s in p.train + p.test) == sorted(f"{f}:{i}" for i in range(1, 11))
    s = p.train[0]
    ex = next(e for e in p.train_examples if e.where == s["where"])
    prompt = tok(f"### Question:\n{ex.fields['question']}\n\n### Answer:\n")["input_ids"]
    answer = tok(ex.fields["answer"], add_special_tokens=False)["input_ids"]
    assert s["input_ids"] == prompt + answer + [tok.eos_token_id]
    assert s["labels"] == [IGNORE] * len(prompt) + answer + [tok.eos_token_id]
    assert len(p.data_hash) == 16 and len(p.template_hash) == 16


@pytest.mark.parametrize("line,field,cause", BAD_ROWS, ids=[c for _, _, c in BAD_ROWS])
def test_each_bad_row_kind_fails_with_place_field_and_cause(tok, tmp_path, line, field, cause):
    f = tmp_path / "d.jsonl"
    f.write_bytes(GOOD + b"\n" + line + b"\n" + GOOD + b"\n")
    with pytest.raises(UserError) as e:
        build(cfg_for(f, tmp_path / "run"), tok, None)
    cause = cause.format(offset=len(GOOD) + 1 + 17)  # the bad byte is the line's 18th
    assert str(e.value) == f"{f}:2: {cause} (use data.on_bad_row=skip to skip and report such rows)"


def test_skip_writes_every_bad_row_and_keeps_the_good_ones(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(
        b"\n".join([GOOD] + [line for line, _, _ in BAD_ROWS] + [GOOD.replace(b"42", b"43")]) + b"\n"
    )
    run = tmp_path / "run"
    p = build(cfg_for(f, run, "data.on_bad_row=skip", "data.test_size=0"), tok, run)
    assert [s["where"] for s in p.train] == [f"{f}:1", f"{f}:{len(BAD_ROWS) + 2}"]
    assert p.rejected == len(BAD_ROWS)
    lines = [json.loads(x) for x in (run / "data_rejects.jsonl").read_text().splitlines()]
    starts = [len(GOOD) + 1 + sum(len(x) + 1 for x, _, _ in BAD_ROWS[:i]) for i in range(len(BAD_ROWS))]
    assert [(r["where"], r["field"], r["cause"]) for r in lines] == [
        (f"{f}:{i}", field, cause.format(offset=start + 17))
        for i, ((_, field, cause), start) in enumerate(zip(BAD_ROWS, starts), start=2)
    ]
    assert lines[0]["row"] == {"question": "What was the revenue?"}  # the row itself is kept for the user


def test_nothing_left_to_train_on_is_an_error(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(BAD_ROWS[0][0] + b"\n")
    with pytest.raises(UserError) as e:
        build(cfg_for(f, tmp_path / "run", "data.on_bad_row=skip"), tok, tmp_path / "run")
    report = tmp_path / "run" / "data_rejects.jsonl"
    assert str(e.value) == f"{f}: its only row was skipped as bad (see {report})"
    assert report.is_file()  # the report the message points at exists (it used to be written after the raise)


def test_field_mapping_end_to_end(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What was the revenue?", "completion": "42 percent."}])
    p = build(
        cfg_for(
            f, tmp_path / "run", "data.fields={question: prompt, answer: completion}", "data.test_size=0"
        ),
        tok,
        None,
    )
    assert p.train_examples[0].fields == {"question": "What was the revenue?", "answer": "42 percent."}
    with pytest.raises(UserError, match="missing field 'question'"):  # without the mapping
        build(cfg_for(f, tmp_path / "run", "data.test_size=0"), tok, None)


def test_dedupe_drops_normalized_duplicates_and_reports_them(tok, tmp_path):
    rows = qa_rows(4) + [{"question": "WHAT was the revenue of company 1", "answer": "it was 1 million"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    p = build(
        cfg_for(f, run, "data.dedupe=true", "data.test_size=0"), tok, run
    )  # policy fail: still no raise
    assert len(p.train) == 4 and p.rejected == 1
    [r] = [json.loads(x) for x in (run / "data_rejects.jsonl").read_text().splitlines()]
    assert (r["where"], r["cause"]) == (f"{f}:5", f"duplicate of {f}:2")


def test_test_path_and_limit(tok, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", qa_rows(6))
    t = write_jsonl(tmp_path / "test.jsonl", qa_rows(2))
    p = build(cfg_for(f, tmp_path / "run", f"data.test_path={t}", "data.limit=3"), tok, None)
    assert [e.where for e in p.train_examples] == [f"{f}:1", f"{f}:2", f"{f}:3"]
    assert [e.where for e in p.test_examples] == [f"{t}:1", f"{t}:2"]


def test_text_files_become_blocks_where_every_token_learns(tok, tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 5)
    p = build(
        cfg_for(
            d,
            tmp_path / "run",
            "data.format=text",
            "data.template=text",
            "data.max_length=16",
            "data.test_size=0",
        ),
        tok,
        None,
    )
    n = len(tok((d / "a.txt").read_text())["input_ids"]) + 1  # + EOS
    assert [len(s["input_ids"]) for s in p.train] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert all(s["labels"] == s["input_ids"] for s in p.train)


def test_chat_rows_flow_through_and_only_assistant_tokens_learn(tok, tmp_path):
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the answer is 42"}]
    f = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": conv}, {"messages": [{"role": "user", "content": "hi"}]}]
    )
    p = build(
        cfg_for(
            f,
            tmp_path / "run",
            "data.format=chat",
            "data.template=chat",
            "data.test_size=0",
            "data.on_bad_row=skip",
        ),
        tok,
        tmp_path / "run",
    )
    assert p.rejected == 1 and [s["where"] for s in p.train] == [f"{f}:1"]
    s = p.train[0]
    learned = [t for t, lab in zip(s["input_ids"], s["labels"], strict=True) if lab != IGNORE]
    # the assistant's content and end-of-turn (render also keeps the template's newline after it)
    assert tok.decode(learned).rstrip("\n") == "the answer is 42<eos>"
    assert "hello" not in tok.decode(learned)


def test_cache_is_reused_and_invalidated(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(12))
    run = tmp_path / "run"
    cfg = cfg_for(f, run, "data.test_size=3")
    first = build(cfg, tok, run)
    meta = run / "data" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = build(cfg, tok, run)
    assert meta.stat().st_mtime_ns == stamp  # read back, not rebuilt
    assert (again.train, again.test, again.train_examples, again.test_examples) == (
        first.train,
        first.test,
        first.train_examples,
        first.test_examples,
    )
    assert (again.data_hash, again.template_hash, again.template) == (
        first.data_hash,
        first.template_hash,
        first.template,
    )
    key = json.loads(meta.read_text())["key"]
    build(cfg_for(f, run, "data.test_size=3", "data.max_length=64"), tok, run)  # a config change
    key2 = json.loads(meta.read_text())["key"]
    assert key2 != key
    write_jsonl(f, qa_rows(13))  # a data change
    p = build(cfg_for(f, run, "data.test_size=3", "data.max_length=64"), tok, run)
    assert json.loads(meta.read_text())["key"] not in (key, key2) and len(p.train) + len(p.test) == 13


def test_prepare_writes_arrays_loadable_without_pickle(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(5))
    cfg = cfg_for(f, tmp_path / "run", "data.test_size=1")
    out = prepare(cfg, tok)
    assert out == tmp_path / "run" / "data"
    with np.load(out / "train.npz", allow_pickle=False) as z:
        assert len(z["offsets"]) == 5 and z["offsets"][-1] == len(z["input_ids"]) == len(z["labels"])
    assert len((out / "test_examples.jsonl").read_text().splitlines()) == 1


def test_hub_id_offline_fails_fast_through_build(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = no_network(monkeypatch)
    with pytest.raises(UserError, match=r"^lamini/lamini_docs: .*local copy"):
        build(cfg_for("lamini/lamini_docs", tmp_path / "run"), tok, tmp_path / "run")
    assert tried == []  # fast because nothing waits on the network: no lookup, no connect, no download


def test_inspect_report_png_and_print(tok, tmp_path):
    rows = qa_rows(30) + [qa_rows(1)[0], {"question": "Long one? " + "word " * 60, "answer": "Short."}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    run = tmp_path / "run"
    cfg = cfg_for(f, run, "data.test_size=4", "data.max_length=40")
    report = inspect_data(cfg, tok, run)
    c = report["counts"]
    assert (c["train"] + c["test"], c["train_samples"] + c["test_samples"]) == (32, 32)
    full = build(cfg_for(f, run, "data.test_size=4", "data.max_length=4096"), tok, None)  # nothing truncated
    lengths = sorted(len(s["input_ids"]) for s in full.train + full.test)
    p99 = math.ceil(np.percentile(lengths, 99))
    assert report["suggested_max_length"] == math.ceil(p99 / 32) * 32
    assert report["share_truncated"] == round(sum(n > 40 for n in lengths) / 32, 4) > 0
    assert [(d["where"], d["of"]) for d in report["duplicates"]] == [(f"{f}:31", f"{f}:1")]
    assert report["rejected"] == 0 and len(report["examples"]) == 2
    assert (run / "data_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report)  # JSON-ready

    console = Console(record=True, width=400, color_system="truecolor")
    print_inspect(report, tok, console)
    out = console.export_text()
    assert "suggested max_length" in out and f"{f}:31 ← {f}:1" in out
    sample = report["examples"][0]
    text = highlight(sample, tok)
    learned = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "black on green")
    answer = next(r for i, r in enumerate(rows, 1) if f"{f}:{i}" == sample["where"])["answer"]
    assert learned == answer + tok.eos_token  # exactly the answer and EOS carry loss


# ---- issue 16: no step may leave an empty split; each says which file and which step emptied it


@pytest.mark.parametrize(
    "name,content", [("e.jsonl", b""), ("e.json", b"[]"), ("e.csv", b"question,answer\n")]
)
def test_empty_data_file_is_an_error_naming_it(tok, tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(UserError, match=rf"^{f}: no data rows \("):
        build(cfg_for(f, tmp_path / "run"), tok, None)
    with pytest.raises(UserError, match=rf"^{f}: no data rows \("):
        inspect_data(cfg_for(f, tmp_path / "run"), tok, tmp_path / "run")


def test_empty_text_file_and_empty_test_path_are_errors(tok, tmp_path):
    t = tmp_path / "empty.txt"
    t.write_bytes(b"")
    with pytest.raises(UserError, match=rf"^{t}: field 'text' is empty"):
        build(
            cfg_for(t, tmp_path / "run", "data.format=text", "data.template=text", "data.test_size=0"),
            tok,
            None,
        )
    f = write_jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    e = tmp_path / "test.jsonl"
    e.write_bytes(b"\n")
    with pytest.raises(UserError, match=rf"^{e}: no data rows \(the file holds only blank lines"):
        build(cfg_for(f, tmp_path / "run", f"data.test_path={e}"), tok, None)
    e.write_bytes(b'{"question": "q"}\n')  # its only row is bad: skipped, and the held-out split is empty
    run = tmp_path / "run"
    with pytest.raises(UserError) as err:
        build(cfg_for(f, run, f"data.test_path={e}", "data.on_bad_row=skip"), tok, run)
    assert str(err.value) == f"{e}: its only row was skipped as bad (see {run / 'data_rejects.jsonl'})"


def test_all_rows_skipped_names_the_count_and_the_report(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"".join(line + b"\n" for line, _, _ in BAD_ROWS))
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        build(cfg_for(f, run, "data.on_bad_row=skip"), tok, run)
    assert (
        str(e.value)
        == f"{f}: all {len(BAD_ROWS)} rows were skipped as bad (see {run / 'data_rejects.jsonl'})"
    )
    assert len((run / "data_rejects.jsonl").read_text().splitlines()) == len(BAD_ROWS)


@pytest.mark.parametrize("n,same", [(1, False), (3, True)])
def test_split_that_leaves_no_test_examples_is_an_error(tok, tmp_path, n, same):
    rows = [{"question": "What was the revenue?", "answer": f"It was {i} million."} for i in range(n)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as e:
        build(cfg_for(f, tmp_path / "run", "data.test_size=0.1"), tok, None)
    same_text = ", all with the same prompt" if same else ""
    assert str(e.value) == (
        f"{f}: data.test_size=0.1 of {n} example{'s' if n > 1 else ''}{same_text} leaves 0 test examples "
        "(use a larger file, a count such as data.test_size=1, or data.test_size=0 to train "
        "without a held-out split)"
    )
    assert (
        len(build(cfg_for(f, tmp_path / "run", "data.test_size=0"), tok, None).train) == n
    )  # the way out works


def test_rendering_that_drops_every_example_is_an_error(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(6))
    run = tmp_path / "run"
    # truncation=right at 4 tokens cuts every answer away: each row is skipped, and nothing is left
    with pytest.raises(UserError) as e:
        build(
            cfg_for(
                f,
                run,
                "data.on_bad_row=skip",
                "data.truncation=right",
                "data.max_length=4",
                "data.test_size=1",
            ),
            tok,
            run,
        )
    assert str(e.value) == (
        f"{f}: all 5 training examples were skipped while rendering (nothing left of them within "
        f"data.max_length) (see {run / 'data_rejects.jsonl'})"
    )


def test_cli_empty_data_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys, model_dir):
    import sys

    from tunesmith import cli

    capsys.readouterr()
    data = tmp_path / "empty.jsonl"
    data.write_bytes(b"")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {format: qa}\n")
    for command in (["data", "inspect"], ["train"]):
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "tunesmith",
                *command,
                str(cfg),
                f"model.name={model_dir}",
                f"data.path={data}",
                f"out_dir={tmp_path / 'run'}",
                "train.max_steps=1",
            ],
        )
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        assert err.strip() == f"error: {data}: no data rows (the file has 0 bytes; check data.path)"
