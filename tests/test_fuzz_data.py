"""Property tests of every reader and format: any input gives rows or a one-line UserError, never loses a row.

Under on_bad_row=skip every non-blank row of the input is either yielded or in the rejects (counted by place);
under fail the first bad row is a one-line UserError that names the file (and the line or row at fault).
Each `@example` is an input that once broke a reader (a traceback, a wrong line, or a silently lost row).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tempfile
from contextlib import nullcontext
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import tiny
from tunesmith.config import DataConfig, UserError
from tunesmith.data.formats import get_template, to_example
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import render
from tunesmith.data.row import Row
from tunesmith.data.sources import read_rows
from tunesmith.data.stream_sources import FileSource

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LINE_END = re.compile(rb"\r\n|\r|\n")
FIELDS = ["question", "answer", "instruction", "input", "output", "text", "messages", "role", "content"]

# JSON values of every type, nested; strings may hold lone surrogates (what a "\ud800" escape decodes to)
TEXT = st.text(max_size=12) | st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2
)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
VALUE = st.recursive(
    SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=6
)
MESSAGE = st.dictionaries(
    st.sampled_from(["role", "content", "x"]),
    st.sampled_from(["user", "assistant", "system", "bot", "hi", " "]) | VALUE,
    max_size=3,
)
RECORD = st.dictionaries(
    st.sampled_from(FIELDS) | TEXT,
    st.sampled_from(["What?", "It is.", " ", ""]) | VALUE | st.lists(MESSAGE, max_size=3),
    max_size=5,
)


def _encode_line(rec: dict, how: str) -> bytes:
    text = json.dumps(rec, ensure_ascii=how == "ascii")
    if how == "latin-1":
        return text.encode("latin-1", "replace")
    if how == "utf-16":
        return text.encode("utf-16", "surrogatepass")
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate written raw: CESU bytes, not UTF-8


LINE = st.one_of(
    st.builds(_encode_line, RECORD, st.sampled_from(["ascii", "utf-8", "latin-1", "utf-16"])),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),  # random bytes
    st.sampled_from([b"", b"  ", b"\t", b"\xef\xbb\xbf", b"[1, 2]", b"null", b"{", b'"x"', b"\xff\xfe"]),
    st.integers(1000, 5000).map(lambda n: b"[" * n),  # deeper than json's recursion limit
    st.integers(100_000, 300_000).map(
        lambda n: b'{"question": "' + b"q" * n + b'", "answer": "a"}'
    ),  # long line
)
FILE = st.tuples(
    st.lists(st.tuples(LINE, st.sampled_from([b"\n", b"\r\n", b"\r"])), max_size=8), st.booleans()
)


def _file_bytes(lines: list[tuple[bytes, bytes]], bom: bool) -> bytes:
    return (b"\xef\xbb\xbf" if bom else b"") + b"".join(line + end for line, end in lines)


def _nonblank_lines(data: bytes) -> list[int]:
    """The line numbers a reader must account for: LF, CRLF and a lone CR end lines; blank: only whitespace"""
    parts = LINE_END.split(data)
    if parts and parts[-1] == b"":
        parts.pop()
    out = []
    for n, raw in enumerate(parts, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append(n)  # undecodable: a row (a bad one)
            continue
        if n == 1:
            text = text.removeprefix("\ufeff")
        if text.strip():
            out.append(n)
    return out


def _assert_one_line(e: UserError, path: Path) -> str:
    msg = str(e)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(str(path)), msg  # names the file (rows add :LINE, :row N or :item N)
    msg.encode("utf-8")  # printable: no lone surrogate on the way to the terminal
    return msg


def _write(tmp: str, name: str, data: bytes) -> Path:
    path = Path(tmp) / name
    path.write_bytes(data)
    return path


def _read_all(path: Path, fmt: str, policy: str) -> tuple[list, Rejects]:
    """read_rows -> to_example over one source, as the pipeline does."""
    rejects = Rejects(policy)
    examples = []
    for row in read_rows(str(path), DataConfig(format=fmt, template=fmt if fmt == "text" else "qa"), rejects):
        ex = to_example(row, fmt, rejects)
        if ex is not None:
            examples.append(ex)
    return examples, rejects


@FUZZ
@given(
    FILE,
    st.sampled_from(["a.jsonl", "a.jsonl.gz", "a.json"]),
    st.sampled_from(["qa", "alpaca", "chat", "text"]),
)
@example(
    ([(b'{"question": "q", "answer": "a"}', b"\r")] * 3, False), "a.jsonl", "qa"
)  # CR ends: 3 rows, not 1
@example(([(b"[" * 3000, b"\n")], False), "a.jsonl", "qa")  # RecursionError inside json
@example(
    ([(b'{"question": "\\ud800", "answer": "a"}', b"\n")], False), "a.jsonl", "qa"
)  # lone surrogate escape
@example(
    ([(b'{"question": "q", "answer": "a"}', b"\n"), (b"\xef\xbb\xbf", b"\n")], True), "a.json", "qa"
)  # .json as jsonl
@example(
    ([(b"\x1c", b"\n")], False), "a.jsonl", "qa"
)  # unicode whitespace only: blank, and then no rows at all
def test_jsonl_and_json_readers_lose_no_row(lines, name, fmt):
    data = _file_bytes(*lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, name, gzip.compress(data) if name.endswith(".gz") else data)
        try:
            examples, rejects = _read_all(path, fmt, "skip")
        except UserError as e:
            msg = _assert_one_line(e, path)
            # under skip only a source without rows, or a .json that is not one JSON list, stops the read
            assert "no data rows" in msg or name == "a.json", msg
            return
        if name != "a.json" or not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):  # read line by line
            expected = {f"{path}:{n}" for n in _nonblank_lines(data)}
            got = [ex.where for ex in examples] + [r["where"] for r in rejects.items]
            assert sorted(got) == sorted(expected)  # each row once: yielded or rejected, none lost or doubled
        for ex in examples:
            assert all(isinstance(v, str) for v in ex.fields.values())
        try:
            _read_all(path, fmt, "fail")
        except UserError as e:
            _assert_one_line(e, path)


ROWS = st.lists(
    st.lists(st.text(st.characters(codec="utf-8"), max_size=20), min_size=1, max_size=4), max_size=6
)


@FUZZ
@given(
    st.lists(
        st.sampled_from(["question", "answer", "text", "id", "a,b", 'q"x', "line\nbreak"]),
        min_size=1,
        max_size=4,
    ),
    ROWS,
    st.sampled_from(["\r\n", "\n", "\r"]),
    st.integers(-1, 40),
    st.booleans(),
)
@example(
    ["question", "answer", "answer"], [["q", "a1", "a2"]], "\n", -1, False
)  # duplicate column lost a value
@example(
    ["line\nbreak", "line\nbreak"], [], "\n", -1, False
)  # a duplicate name with a line break: a 2-line message
@example(["text"], [['"unclosed'], ["next"]], "\n", -1, True)  # raw quote: rows merged into one, silently
@example(["question", "answer"], [["q", "x" * 200_000]], "\n", -1, False)  # over csv's 128 KiB field limit
def test_csv_reader_loses_no_row(header, rows, end, corrupt_at, raw_quote):
    buf = io.StringIO()
    # QUOTE_ALL: with lineterminator="\r" the writer leaves a field holding "\n" unquoted (two rows, not one)
    csv.writer(buf, lineterminator=end, quoting=csv.QUOTE_ALL).writerows([header, *rows])
    data = buf.getvalue().encode("utf-8")
    if raw_quote and rows:  # a quote the writer did not escape: malformed csv
        data = data + b'"' + b"x\n" * 3
    if 0 <= corrupt_at < len(data):
        data = data[:corrupt_at] + b"\xff" + data[corrupt_at:]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, "a.csv", data)
        try:
            examples, rejects = _read_all(path, "qa", "skip")
        except UserError as e:
            _assert_one_line(e, path)
            return
        if not raw_quote and corrupt_at < 0:  # well-formed: every written row is accounted for
            assert len(examples) + rejects.count == len(rows)
        try:
            _read_all(path, "qa", "fail")
        except UserError as e:
            _assert_one_line(e, path)


@FUZZ
@given(
    st.binary(max_size=300), st.sampled_from(["a.csv", "a.parquet", "a.json", "a.jsonl.gz", "a.txt", "a.md"])
)
@example(b"\x1f\x8b\x08\x00junk", "a.jsonl.gz")  # a corrupt gzip stream: zlib.error / EOFError
@example(b"PAR1\x00\x00PAR1", "a.parquet")  # pyarrow's multi-line error text
@example(b"\xef\xbb\xbf", "a.txt")  # a BOM and nothing else: an empty document
@example("caf\xe9\r\nline".encode("latin-1"), "a.txt")  # latin-1 in a utf-8 file
@example("text\n".encode("utf-16"), "a.csv")  # utf-16: the header is not UTF-8
def test_random_bytes_give_rows_or_one_line_error(data, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, name, data)
        fmt = "text" if name.endswith((".txt", ".md")) else "qa"
        for policy in ("skip", "fail"):
            try:
                examples, rejects = _read_all(path, fmt, policy)
            except UserError as e:
                _assert_one_line(e, path)
                continue
            if fmt == "text":
                assert len(examples) + rejects.count == 1  # one file, one document: kept or reported


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "question": st.none() | st.text(max_size=10) | st.integers(),
                "answer": st.none() | st.text(max_size=10),
            }
        ),
        max_size=8,
    ),
    st.integers(1, 3),
)
def test_parquet_reader_yields_every_row(records, batch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunesmith.data.sources import read_parquet

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.parquet"
        q = [r["question"] if not isinstance(r["question"], int) else str(r["question"]) for r in records]
        pq.write_table(
            pa.table(
                {
                    "question": pa.array(q, pa.string()),
                    "answer": pa.array([r["answer"] for r in records], pa.string()),
                }
            ),
            path,
        )
        assert len(list(read_parquet(path, batch_rows=batch))) == len(records)
        try:
            examples, rejects = _read_all(path, "qa", "skip")
        except UserError as e:
            assert not records and "0 rows" in _assert_one_line(e, path)
            return
        assert len(examples) + rejects.count == len(records)


_TOK = tiny.tokenizer()


@FUZZ
@given(RECORD, st.sampled_from(["qa", "alpaca", "chat", "text"]))
@example({"question": "q\ud800", "answer": "a"}, "qa")  # the tokenizer and the cache writer failed far away
@example(
    {"messages": [{"role": "user\nx", "content": "c"}]}, "chat"
)  # a role with a line break in the message
@example({"question": "q", "answer": "a", "\udc80": "x"}, "qa")  # a surrogate in an extra column's name
def test_to_example_validates_or_reports_and_what_it_keeps_renders(record, fmt):
    row = Row("f.jsonl:7", record)
    rejects = Rejects("skip")
    ex = to_example(row, fmt, rejects)
    assert (ex is None) == (rejects.count == 1) and rejects.count <= 1
    with pytest.raises(UserError) if ex is None else nullcontext():
        try:
            to_example(row, fmt, Rejects("fail"))
        except UserError as e:
            assert str(e).startswith("f.jsonl:7: ") and "\n" not in str(e)
            str(e).encode("utf-8")  # printable: a lone surrogate is written as its escape
            raise
    if ex is None:
        with tempfile.TemporaryDirectory() as tmp:
            r = Rejects("skip", tmp)
            r.items = rejects.items
            assert (
                json.loads(r.write().read_text(encoding="utf-8"))["where"] == "f.jsonl:7"
            )  # lone surrogates too
        return
    template = get_template("chat" if fmt == "chat" else fmt, fmt)
    render([ex], template, _TOK, 64, "prompt_left", Rejects("skip"))  # what to_example keeps can be tokenized


@FUZZ
@given(FILE, st.sampled_from(["a.jsonl", "a.txt"]))
@example(([(b'{"text": "a"}', b"\r")] * 3, False), "a.jsonl")  # CR line ends in a streamed file
@example(([(b'{"text": "a\xff"}', b"\n")], True), "a.jsonl")  # the only row is bad: an error, never a hang
def test_streaming_reader_accounts_for_every_line(lines, name):
    data = _file_bytes(*lines).replace(b'"question"', b'"text"')
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, name, data)
        src = FileSource(str(path), [path], "text", Rejects("skip"))
        got = set()
        try:
            for _ in range(50):
                piece = src.read()
                if src.epoch > 0:
                    break
                got.add(piece.where)
        except UserError as e:
            _assert_one_line(e, path)
        if name.endswith(".jsonl"):
            got |= {r["where"] for r in src.rejects.items}
            assert got == {f"{path}:{n}" for n in _nonblank_lines(data)}
        try:
            FileSource(str(path), [path], "text", Rejects("fail")).read()
        except UserError as e:
            _assert_one_line(e, path)
