"""Readers: every format, the place of every row, every bad-row kind, column mapping, streaming, the hub
offline.
"""

from __future__ import annotations

import csv
import json
import socket

import pytest

from tunesmith.config import DataConfig, UserError
from tunesmith.data.rejects import Rejects
from tunesmith.data.sources import read_rows


def rows(path, **cfg):
    rej = Rejects(cfg.pop("policy", "skip"))
    out = [(r.where, r.fields) for r in read_rows(str(path), DataConfig(**cfg), rej)]
    return out, rej


def no_network(monkeypatch) -> list[str]:
    """Refuse and record each DNS lookup, connection, hub download: the list stays empty if none is tried."""
    import datasets

    tried: list[str] = []

    def refuse(what: str):
        def call(*args, **kwargs):
            tried.append(what)
            raise OSError(f"{what}: no network in this test")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(datasets, "load_dataset", refuse("datasets.load_dataset"))
    return tried


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_where_is_file_and_line_blank_lines_ignored(tmp_path):
    f = write_lines(
        tmp_path / "a.jsonl",
        [b'{"question": "q1", "answer": "a1"}', b"", b'{"question": "q2", "answer": "a2"}'],
    )
    out, rej = rows(f)
    assert out == [
        (f"{f}:1", {"question": "q1", "answer": "a1"}),
        (f"{f}:3", {"question": "q2", "answer": "a2"}),
    ]
    assert rej.count == 0


def test_jsonl_bom_on_first_line_is_accepted(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "a"}\n')
    assert rows(f)[0] == [(f"{f}:1", {"question": "q", "answer": "a"})]


def test_invalid_json_fails_with_place_message_and_column(tmp_path):
    f = write_lines(
        tmp_path / "a.jsonl", [b'{"question": "q", "answer": "a"}', b'{"question": "q" "answer": "a"}']
    )
    with pytest.raises(UserError) as e:
        rows(f, policy="fail")
    assert str(e.value) == (
        f"{f}:2: invalid JSON (Expecting ',' delimiter at column 18) "
        "(use data.on_bad_row=skip to skip and report such rows)"
    )


def test_bad_rows_skipped_and_reported_each_with_cause(tmp_path):
    f = write_lines(
        tmp_path / "a.jsonl",
        [
            b'{"question": "ok1", "answer": "a"}',
            b'{"question": oops}',  # invalid JSON
            b'["not", "an", "object"]',  # not an object
            b'{"question": "caf\xe9", "answer": "a"}',  # latin-1 byte: invalid UTF-8
            b'{"question": "ok2", "answer": "a"}',
        ],
    )
    out, rej = rows(f)
    assert [w for w, _ in out] == [f"{f}:1", f"{f}:5"]
    assert [(i["where"], i["cause"]) for i in rej.items] == [
        (f"{f}:2", "invalid JSON (Expecting value at column 14)"),
        (f"{f}:3", "row is not a JSON object (got list)"),
        (f"{f}:4", "invalid UTF-8 (byte 0xe9 at column 18, file offset 95)"),
    ]


def test_rejects_write_lists_every_skipped_row(tmp_path):
    rej = Rejects("skip", tmp_path / "run")
    rej.bad("f.jsonl:3", "answer", "field 'answer' is empty", {"question": "q", "answer": " "})
    rej.bad("f.jsonl:9", None, "invalid JSON (Expecting value at column 1)")
    path = rej.write()
    assert path == tmp_path / "run" / "data_rejects.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [
        {
            "where": "f.jsonl:3",
            "field": "answer",
            "cause": "field 'answer' is empty",
            "row": {"question": "q", "answer": " "},
        },
        {
            "where": "f.jsonl:9",
            "field": None,
            "cause": "invalid JSON (Expecting value at column 1)",
            "row": None,
        },
    ]
    assert rej.count == 2
    assert Rejects("skip", None).write() is None


def test_rejects_fail_policy_raises_one_line():
    with pytest.raises(UserError, match=r"^f.jsonl:7: field 'answer' is empty \(use data.on_bad_row=skip"):
        Rejects("fail").bad("f.jsonl:7", "answer", "field 'answer' is empty")


def test_read_rows_is_lazy(tmp_path):
    # The bad line 2 is only seen when the generator gets there: rows are streamed, not read up front.
    f = write_lines(tmp_path / "a.jsonl", [b'{"question": "q", "answer": "a"}', b"{bad"])
    it = read_rows(str(f), DataConfig(), Rejects("fail"))
    assert next(it).where == f"{f}:1"
    with pytest.raises(UserError, match=":2: invalid JSON"):
        next(it)


def test_json_list_items_and_errors(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"question": "q1", "answer": "a1"}, 7, {"question": "q2", "answer": "a2"}]))
    out, rej = rows(f)
    assert [w for w, _ in out] == [f"{f}:item 1", f"{f}:item 3"]
    assert (
        rej.items[0]["where"] == f"{f}:item 2"
        and rej.items[0]["cause"] == "row is not a JSON object (got int)"
    )
    g = tmp_path / "b.json"
    g.write_text('{"question": "q"}')
    with pytest.raises(UserError, match="must hold a list of objects"):
        rows(g)
    h = tmp_path / "c.json"
    h.write_text('[{"question": "q"},\n {"question": }]')
    with pytest.raises(UserError, match=r"c.json:2: invalid JSON \(Expecting value at column 15\)"):
        rows(h)


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path):
    f = write_lines(tmp_path / "a.json", [b'{"question": "q1"}', b'{"question": "q2"}'])
    assert [w for w, _ in rows(f)[0]] == [f"{f}:1", f"{f}:2"]


def test_csv_rows_counted_from_one_after_header(tmp_path):
    f = tmp_path / "a.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer"])
        w.writerow(["q1", "line one\nline two"])  # one row spanning two lines
        w.writerow(["q2", "a2", "extra"])  # too many values
        w.writerow(["q3", "a3"])
    out, rej = rows(f)
    assert out == [
        (f"{f}:row 1", {"question": "q1", "answer": "line one\nline two"}),
        (f"{f}:row 3", {"question": "q3", "answer": "a3"}),
    ]
    assert (
        rej.items[0]["where"] == f"{f}:row 2"
        and rej.items[0]["cause"] == "row has 3 values, the header has 2 (line 4)"
    )


def test_csv_invalid_utf8_names_row_and_field(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(b"question,answer\nq1,a1\nq2,caf\xe9\nq3,a3\n")
    out, rej = rows(f)
    assert [w for w, _ in out] == [f"{f}:row 1", f"{f}:row 3"]
    assert (rej.items[0]["where"], rej.items[0]["field"], rej.items[0]["cause"]) == (
        f"{f}:row 2",
        "answer",
        "field 'answer' is not valid UTF-8 (byte 0xe9 at line 3)",
    )


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]}), f)
    expected = [(f"{f}:row {i}", {"question": f"q{i}", "answer": f"a{i}"}) for i in (1, 2, 3)]
    assert rows(f)[0] == expected
    from tunesmith.data.sources import read_parquet

    assert [
        (r.where, r.fields) for r in read_parquet(f, batch_rows=2)
    ] == expected  # across two record batches


def test_directory_and_glob_are_sorted_and_skip_hidden_and_other_suffixes(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    write_lines(d / "b.jsonl", [b'{"question": "b"}'])
    write_lines(d / "a.jsonl", [b'{"question": "a"}'])
    write_lines(d / "sub" / "c.jsonl", [b'{"question": "c"}'])
    write_lines(d / ".hidden.jsonl", [b"{bad"])
    (d / "README.md").write_text("# not data for qa")
    out, _ = rows(d)
    assert [f["question"] for _, f in out] == ["a", "b", "c"]
    out, _ = rows(str(d / "*.jsonl"))
    assert [f["question"] for _, f in out] == ["a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="directory holds no data files"):
        rows(tmp_path / "empty")
    with pytest.raises(UserError, match="glob matches no data files"):
        rows(str(tmp_path / "nothing*.jsonl"))


def test_text_files_one_row_per_file(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.md").write_text("# Title\nbody")
    (d / "a.txt").write_text("first document")
    (d / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    out, rej = rows(d, format="text", template="text")
    assert out == [
        (str(d / "a.txt"), {"text": "first document"}),
        (str(d / "b.md"), {"text": "# Title\nbody"}),
    ]
    assert (rej.items[0]["where"], rej.items[0]["cause"]) == (
        f"{d / 'bad.txt'}:2",
        "invalid UTF-8 (byte 0xff at column 6, file offset 14)",
    )


def test_field_mapping_and_text_field(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [b'{"prompt": "q", "completion": "a", "id": 1}'])
    out, _ = rows(f, fields={"question": "prompt", "answer": "completion"})
    assert out[0][1] == {"question": "q", "answer": "a", "id": 1}
    g = write_lines(tmp_path / "t.jsonl", [b'{"content": "raw"}'])
    out, _ = rows(g, format="text", template="text", text_field="content")
    assert out[0][1] == {"text": "raw"}


def test_missing_local_file_fails(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        rows(tmp_path / "nope.jsonl")


def test_hub_id_offline_fails_fast_with_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = no_network(monkeypatch)
    with pytest.raises(UserError) as e:
        rows("someorg/some-dataset-that-is-not-cached")
    assert tried == []  # fast because nothing waits on the network: no lookup, no connect, no download
    msg = str(e.value)
    assert (
        msg.startswith("someorg/some-dataset-that-is-not-cached: ")
        and "local copy" in msg
        and "\n" not in msg
    )


def test_gzipped_jsonl(tmp_path):
    import gzip

    f = tmp_path / "a.jsonl.gz"
    with gzip.open(f, "wb") as fh:
        fh.write(b'{"question": "q1"}\n{"question": "q2"}\n')
    assert rows(f)[0] == [(f"{f}:1", {"question": "q1"}), (f"{f}:2", {"question": "q2"})]


# ---- issue 16: an empty source is an error naming the file; every reader names the real line of a bad byte


def _parquet(path, n):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [f"q{i}" for i in range(n)], "answer": ["a"] * n}), path)
    return path


@pytest.mark.parametrize(
    "name,content,cause",
    [
        ("a.jsonl", b"", "the file has 0 bytes"),
        ("a.jsonl", b"\n  \n\r\n", "the file holds only blank lines"),
        ("a.json", b"[]", "the JSON list is empty"),
        ("a.json", b"", "the file has 0 bytes"),
        ("a.csv", b"question,answer\n", "the csv has a header but no data rows"),
        ("a.csv", b"question,answer\n\n\n", "the csv has a header but no data rows"),
        ("a.parquet", None, "the parquet file has 0 rows"),
        ("a.jsonl.gz", b"", "the file holds only blank lines"),  # 20 bytes of gzip framing around nothing
    ],
)
def test_empty_source_is_an_error_naming_the_file(tmp_path, name, content, cause):
    import gzip

    f = tmp_path / name
    if name.endswith(".parquet"):
        _parquet(f, 0)
    else:
        f.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    for policy in ("fail", "skip"):
        with pytest.raises(UserError) as e:
            rows(f, policy=policy)
        assert str(e.value) == f"{f}: no data rows ({cause}; check data.path)"


def test_directory_of_empty_files_is_an_error_but_one_empty_file_among_others_is_not(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"")
    (d / "b.csv").write_bytes(b"question,answer\n")
    with pytest.raises(UserError, match=rf"^{d}: none of its 2 data files holds a row"):
        rows(d)
    write_lines(d / "c.jsonl", [b'{"question": "q"}'])
    assert [w for w, _ in rows(d)[0]] == [f"{d / 'c.jsonl'}:1"]


def _line_41(bad: bytes, eol: bytes = b"\n") -> bytes:
    good = [
        json.dumps({"question": f"What is question {i} about?", "answer": f"Answer {i}."}).encode()
        for i in range(40)
    ]
    return eol.join([*good, b'{"question": "caf' + bad + b'", "answer": "a"}', *good[:3]]) + eol


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.json"])
def test_invalid_utf8_on_line_41_is_reported_on_line_41(tmp_path, name, eol):
    # Was `a.jsonl:1 ... (byte 0xff at column 2893)` for a file with CR line ends: the reader split on LF
    # only.
    import gzip

    data = _line_41(b"\xff", eol)
    f = tmp_path / name
    f.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    offset = data.index(b"\xff")
    at = "" if name.endswith(".gz") else f", file offset {offset}"
    with pytest.raises(UserError) as e:
        rows(f, policy="fail")
    assert str(e.value).startswith(f"{f}:41: invalid UTF-8 (byte 0xff at column 18{at})")
    out, rej = rows(f)
    assert len(out) == 43 and [i["where"] for i in rej.items] == [f"{f}:41"]


def test_invalid_utf8_in_a_json_array_csv_and_text_file_names_the_line(tmp_path):
    items = [json.dumps({"question": f"q{i}", "answer": "a"}).encode() for i in range(40)]
    f = tmp_path / "a.json"
    data = b"[\r" + b",\r".join([*items, b'{"question": "caf\xe9"}']) + b"]\r"
    f.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(
        UserError, match=rf"^{f}:42: invalid UTF-8 \(byte 0xe9 at column 18, file offset {offset};"
    ):
        rows(f)
    c = tmp_path / "a.csv"
    c.write_bytes(
        b"question,answer\r" + b"".join(b"q%d,a\r" % i for i in range(39)) + b'"multi\rline",caf\xe9\r'
    )
    _, rej = rows(c)
    assert (rej.items[0]["where"], rej.items[0]["cause"]) == (
        f"{c}:row 40",
        "field 'answer' is not valid UTF-8 (byte 0xe9 at line 42)",
    )
    t = tmp_path / "a.txt"
    t.write_bytes(b"line\r" * 40 + b"caf\xe9\r")
    _, rej = rows(t, format="text", template="text")
    assert (rej.items[0]["where"], rej.items[0]["cause"]) == (
        f"{t}:41",
        "invalid UTF-8 (byte 0xe9 at column 4, file offset 203)",
    )


def test_csv_unclosed_quote_and_duplicate_header_are_errors_not_merged_rows(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(
        b'text\nfirst\n"second\nthird\nfourth\n'
    )  # one column: the quote used to swallow the file silently
    out, rej = rows(f, format="text", template="text")
    assert [w for w, _ in out] == [f"{f}:row 1"]
    assert (rej.items[0]["where"], rej.items[0]["cause"]) == (
        f"{f}:row 2",
        "malformed csv at lines 3-5 (unexpected end of data)",
    )
    g = tmp_path / "b.csv"
    g.write_bytes(b"question,answer,answer\nq,a1,a2\n")  # dict(zip()) kept a2 and dropped a1
    with pytest.raises(UserError, match=rf"^{g}:1: the header names column 'answer' twice"):
        rows(g)


def test_long_csv_field_is_read_not_a_csv_error(tmp_path):
    f = tmp_path / "a.csv"
    long = "x" * 300_000  # over the csv module's default 128 KiB field limit
    f.write_text(f"question,answer\nq,{long}\n")
    assert rows(f)[0][0][1]["answer"] == long


def test_deep_json_and_corrupt_gzip_are_user_errors(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [b'{"question": "q"}', b"[" * 100_000])
    out, rej = rows(f)
    assert len(out) == 1 and (rej.items[0]["where"], rej.items[0]["cause"]) == (
        f"{f}:2",
        "invalid JSON (nested too deeply)",
    )
    g = tmp_path / "a.jsonl.gz"
    import gzip

    g.write_bytes(gzip.compress(b'{"question": "q"}\n' * 1000)[:-30])  # truncated
    with pytest.raises(UserError, match=rf"^{g}:\d+: cannot read the file \(Compressed file ended"):
        rows(g)
    h = tmp_path / "b.jsonl.gz"
    h.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=rf"^{h}:1: cannot read the file \(Not a gzipped file"):
        rows(h)


def test_hub_rows_that_do_not_parse_or_do_not_exist_are_user_errors(monkeypatch):
    import datasets

    from tunesmith.data import hub

    def rows_then_bad_byte():
        yield {"question": "q1", "answer": "a"}
        yield {"question": "q2", "answer": "a"}
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows_then_bad_byte())
    out, _ = [], None
    with pytest.raises(UserError) as e:
        out.extend(read_rows("org/ds", DataConfig(), Rejects("skip")))
    assert len(out) == 2 and str(e.value) == (
        "org/ds[train]:row 3: cannot read the hub dataset past row 2 ('utf-8' codec "
        "can't decode byte 0xff in position 0: invalid start byte)"
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([]))
    with pytest.raises(
        UserError, match=r"^org/ds\[train\]: the hub dataset has no rows \(check data.split\)$"
    ):
        rows("org/ds")
