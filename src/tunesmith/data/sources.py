"""Readers: records from jsonl / json / csv / parquet / text files, directories, globs or the hub -> Rows.

Every reader streams (a generator; a jsonl file is never held in memory whole) and gives each row its
place so a bad row can be reported as `file:line`:
- jsonl: `file:LINE` (1-based line in the file; LF, CRLF and a lone CR each end a line, as in an editor)
- json (a list of objects): `file:item N` (1-based position in the list)
- csv: `file:row N` (1-based data row; the header is row 0; a quoted field may span several lines,
  which is why csv counts rows, not lines, and names the line in the cause)
- parquet: `file:row N` (1-based)
- txt/md (format=text): one Row per file, `file`, fields {"text": content}
- hub: `id[split]:row N` (1-based)
Column mapping (`data.fields: {canonical: source_name}`) is applied here, so later stages only see the
canonical names.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from tunesmith.config import DataConfig, UserError
from tunesmith.data.hub import read_hub
from tunesmith.data.locate import resolve_files
from tunesmith.data.rejects import Rejects, first_line, one_line
from tunesmith.data.row import Row

# surrogateescape turns each undecodable byte into one lone surrogate in this range; finding one = bad UTF-8
_BAD_BYTE = re.compile("[\udc80-\udcff]")
_LONE_CR = re.compile(rb"\r(?!\n)")  # old Mac / some exports end lines with CR alone


def read_rows(path: str, cfg: DataConfig, rejects: Rejects) -> Iterator[Row]:
    """Stream the rows of a file, directory, glob or hub id, with cfg.fields mapping applied."""
    mapping = dict(cfg.fields)
    if cfg.format == "text" and cfg.text_field != "text":
        mapping.setdefault("text", cfg.text_field)  # formats read raw text from the canonical "text"
    if not mapping:
        yield from _raw_rows(path, cfg, rejects)
        return
    for row in _raw_rows(path, cfg, rejects):
        yield Row(row.where, map_fields(row.fields, mapping))


def map_fields(fields: dict, mapping: dict[str, str]) -> dict:
    """Rename source columns to canonical names: mapping is {canonical: source_name}."""
    out = dict(fields)
    for canonical, source in mapping.items():
        if source in out and source != canonical:
            out[canonical] = out.pop(source)
    return out


def _raw_rows(path: str, cfg: DataConfig, rejects: Rejects) -> Iterator[Row]:
    files = resolve_files(path, cfg)
    seen = 0  # rows read, good or bad: a source with none is an error, never an empty run
    for f in files if files is not None else [None]:
        before = rejects.count
        for row in read_hub(path, cfg) if f is None else _read_file(f, rejects):
            seen += 1
            yield row
        seen += rejects.count - before
    if not seen:
        raise UserError(_no_rows(path, files, cfg))


def _read_file(f: Path, rejects: Rejects) -> Iterator[Row]:
    name = f.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(f, rejects)
    if name.endswith(".json"):
        return read_json(f, rejects)
    if name.endswith(".csv"):
        return read_csv(f, rejects)
    if name.endswith(".parquet"):
        return read_parquet(f)
    return read_text_file(f, rejects)


_EMPTY = {
    ".csv": "the csv has a header but no data rows",
    ".json": "the JSON list is empty",
    ".parquet": "the parquet file has 0 rows",
}


def _no_rows(path: str, files: list[Path] | None, cfg: DataConfig) -> str:
    if files is None:
        return f"{path}[{cfg.split}]: the hub dataset has no rows (check data.split)"
    if len(files) > 1:
        return f"{path}: none of its {len(files)} data files holds a row (all empty; check data.path)"
    f = files[0]
    kind = next((k for k in _EMPTY if f.name.lower().endswith(k)), "")
    cause = (
        "the file has 0 bytes"
        if f.stat().st_size == 0
        else _EMPTY.get(kind, "the file holds only blank lines")
    )
    return f"{f}: no data rows ({cause}; check data.path)"


def split_lines(chunk: bytes) -> list[bytes]:
    """A chunk read up to b'\\n', cut after each lone b'\\r' (a line end too in editors); mostly [chunk]."""
    i = chunk.find(b"\r")
    if i < 0 or (i == len(chunk) - 2 and chunk.endswith(b"\n")):  # no CR, or only the CR of a CRLF ending
        return [chunk]
    parts, start = [], 0
    for m in _LONE_CR.finditer(chunk):
        parts.append(chunk[start : m.end()])
        start = m.end()
    if start < len(chunk):
        parts.append(chunk[start:])
    return parts


def place(data: bytes | str, pos: int) -> tuple[int, int]:
    """(line, column), both 1-based, of position `pos` in `data`; \\n, \\r\\n and a lone \\r end a line."""
    nl, cr = ("\n", "\r") if isinstance(data, str) else (b"\n", b"\r")
    head = data[:pos]
    line = head.count(nl) + head.count(cr) - head.count(cr + nl) + 1
    return line, pos - max(head.rfind(nl), head.rfind(cr))


def decode_line(raw: bytes, path: Path, lineno: int, offset: int | None, rejects: Rejects) -> str | None:
    """The UTF-8 text of one line (a BOM dropped from line 1), or None once the bad byte is reported."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # offset: where the byte is in the file, for a hex editor (None for compressed files)
        at = f", file offset {offset + e.start}" if offset is not None else ""
        rejects.bad(
            f"{path}:{lineno}",
            None,
            f"invalid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}{at})",
            {"raw": raw[:500].decode("utf-8", "replace")},
        )
        return None
    return text[1:] if lineno == 1 and text.startswith("\ufeff") else text


def parse_object(text: str, where: str, rejects: Rejects) -> dict | None:
    """The JSON object on one line, or None once the problem is reported."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        rejects.bad(where, None, f"invalid JSON ({e.msg} at column {e.colno})", {"raw": text[:500]})
        return None
    except RecursionError:  # json recurses per nesting level: ~1000 levels of [ or { exhaust the stack
        rejects.bad(where, None, "invalid JSON (nested too deeply)", {"raw": text[:500]})
        return None
    if not isinstance(obj, dict):
        rejects.bad(where, None, f"row is not a JSON object (got {type(obj).__name__})", {"raw": text[:500]})
        return None
    return obj


def read_jsonl(path: Path, rejects: Rejects) -> Iterator[Row]:
    """One JSON object per line (LF, CRLF or a lone CR ends one); blank lines ignored, bad ones reported."""
    gz = path.name.lower().endswith(".gz")
    prefix = f"{path}:"
    lineno, offset = 0, 0  # offset: of the line in the file as stored (a .gz has none worth showing)
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for chunk in f:
                i = chunk.find(b"\r")
                # one loop, no call per line: a generator or a decode function per line costs ~10% of reading
                for raw in (
                    (chunk,) if i < 0 or (i == len(chunk) - 2 and chunk[-1] == 10) else split_lines(chunk)
                ):
                    lineno += 1
                    start, offset = offset, offset + len(raw)
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        # reports the byte
                        text = decode_line(raw, path, lineno, None if gz else start, rejects)
                    if lineno == 1 and text:
                        text = text.removeprefix("\ufeff")
                    if not text or text.isspace():  # blank (or reported): no stripped copy of every line
                        continue
                    where = f"{prefix}{lineno}"
                    obj = parse_object(text, where, rejects)
                    if obj is not None:
                        yield Row(where, obj)
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz; plain files never get here
        raise UserError(f"{path}:{lineno + 1}: cannot read the file ({first_line(e)})") from None


def read_json(path: Path, rejects: Rejects) -> Iterator[Row]:
    """A JSON array of objects (the whole file is parsed: JSON arrays cannot be streamed without ijson)."""
    data = path.read_bytes()
    # surrogateescape: a bad byte becomes one lone surrogate, found below with its exact place
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    if not text.strip():
        return  # no rows: the caller reports the empty file
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: it is jsonl, read it as such
            yield from read_jsonl(path, rejects)
            return
        _json_bad_byte(path, data)
        line, col = place(text, e.pos)
        raise UserError(f"{path}:{line}: invalid JSON ({e.msg} at column {col})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid JSON (nested too deeply)") from None
    _json_bad_byte(path, data)
    if not isinstance(obj, list):
        raise UserError(
            f"{path}: a .json file must hold a list of objects (got {type(obj).__name__}; "
            "use .jsonl for one object per line)"
        )
    for i, item in enumerate(obj, start=1):
        where = f"{path}:item {i}"
        if isinstance(item, dict):
            yield Row(where, item)
        else:
            rejects.bad(where, None, f"row is not a JSON object (got {type(item).__name__})", {"raw": item})


def _json_bad_byte(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = place(data, e.start)
        raise UserError(
            f"{path}:{line}: invalid UTF-8 (byte {data[e.start]:#04x} at column {col}, file offset "
            f"{e.start}; re-save the file as UTF-8)"
        ) from None


def read_csv(path: Path, rejects: Rejects) -> Iterator[Row]:
    """Rows of a csv with a header line; `file:row N` counts data rows from 1 (the header is row 0)."""
    # A long document is a legitimate field; the default 128 KiB cap would stop the file with csv.Error.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    # surrogateescape keeps the stream going past a bad byte so the one bad row can be reported and skipped
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        # strict: an unclosed quote or text after a closing quote is an error, not rows silently merged
        reader = csv.reader(f, strict=True)
        header = _csv_header(path, reader)
        n, end = 0, reader.line_num
        while True:
            start = end + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                n, end = n + 1, reader.line_num
                rejects.bad(f"{path}:row {n}", None, f"malformed csv at lines {start}-{end} ({e})")
                continue
            end = reader.line_num
            if not values:
                continue  # a blank line is not a row
            n += 1
            row = _csv_row(path, n, start, header, values, rejects)
            if row is not None:
                yield row


def _csv_header(path: Path, reader) -> list[str]:
    try:
        header = next((h for h in reader if h), None)
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed csv header ({e})") from None
    if header is None:
        return []  # no rows: the caller reports the empty file
    if any(_BAD_BYTE.search(h) for h in header):
        raise UserError(f"{path}:{reader.line_num}: invalid UTF-8 in the header (re-save the file as UTF-8)")
    dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if dup is not None:  # dict(zip()) would keep only the last of the two columns
        raise UserError(
            f"{path}:{reader.line_num}: the header names column '{one_line(dup)}' twice (rename one)"
        )
    return header


def _csv_row(
    path: Path, n: int, start: int, header: list[str], values: list[str], rejects: Rejects
) -> Row | None:
    where = f"{path}:row {n}"
    if len(values) != len(header):
        rejects.bad(
            where,
            None,
            f"row has {len(values)} values, the header has {len(header)} (line {start})",
            {"raw": [_clean(v) for v in values]},
        )
        return None
    for i, (h, v) in enumerate(zip(header, values, strict=True)):
        m = _BAD_BYTE.search(v)
        if m is not None:
            # line breaks only occur inside quoted fields, so the values before the byte give its line
            line = start + sum(place(x, len(x))[0] - 1 for x in values[:i]) + place(v, m.start())[0] - 1
            rejects.bad(
                where,
                h,
                f"field '{h}' is not valid UTF-8 (byte {ord(m.group()) - 0xDC00:#04x} at line {line})",
                dict(zip(header, (_clean(x) for x in values), strict=True)),
            )
            return None
    return Row(where, dict(zip(header, values, strict=True)))


def _clean(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_parquet(path: Path, batch_rows: int = 4096) -> Iterator[Row]:
    """Rows of a parquet file, read in record batches (never the whole table)."""
    import pyarrow as pa  # comes with `datasets`
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError zoo; all mean "not a parquet file"
        raise UserError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    n = 0
    batches = pf.iter_batches(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:  # a corrupt page: name the rows reached so far
            raise UserError(
                f"{path}:row {n + 1}: cannot read the parquet file past row {n} ({first_line(e)})"
            ) from None
        if batch is None:
            return
        for rec in batch.to_pylist():
            n += 1
            yield Row(f"{path}:row {n}", rec)


def read_text_file(path: Path, rejects: Rejects) -> Iterator[Row]:
    """A whole .txt/.md file as one row {"text": content} (format=text)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = place(data, e.start)
        rejects.bad(
            f"{path}:{line}",
            None,
            f"invalid UTF-8 (byte {data[e.start]:#04x} at column {col}, file offset {e.start})",
            {"raw": data[:500].decode("utf-8", "replace")},
        )
        return
    yield Row(str(path), {"text": text.removeprefix("\ufeff")})
