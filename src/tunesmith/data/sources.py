"""Readers: records from jsonl / json / csv / parquet / text files, directories, globs or the hub -> Rows.

Every reader streams (a generator; a jsonl file is never held in memory whole) and gives each row its
place so a bad row can be reported as `file:line`:
- jsonl: `file:LINE` (1-based line in the file)
- json (a list of objects): `file:item N` (1-based position in the list)
- csv: `file:row N` (1-based data row; the header is row 0; a quoted field may span several lines,
  which is why csv counts rows, not lines)
- parquet: `file:row N` (1-based)
- txt/md (format=text): one Row per file, `file`, fields {"text": content}
- hub: `id[split]:row N` (1-based)
Column mapping (`data.fields: {canonical: source_name}`) is applied here, so later stages only see the
canonical names.
"""

from __future__ import annotations

import csv
import glob as globlib
import gzip
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tunesmith.config import DataConfig, UserError
from tunesmith.data.rejects import Rejects

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
TEXT_SUFFIXES = (".txt", ".md")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# surrogateescape turns each undecodable byte into one lone surrogate in this range; finding one = bad UTF-8
_BAD_BYTE = re.compile("[\udc80-\udcff]")


@dataclass
class Row:
    """One raw record and where it came from (`file:line`, `file:row N`, ...)."""

    where: str
    fields: dict


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


def resolve_files(path: str, cfg: DataConfig) -> list[Path] | None:
    """The sorted local files behind `path`, or None when `path` names a hub dataset."""
    suffixes = TEXT_SUFFIXES + RECORD_SUFFIXES if cfg.format == "text" else RECORD_SUFFIXES
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _wanted(f, suffixes, p))
        if not files:
            raise UserError(f"{path}: directory holds no data files ({', '.join(suffixes)})")
        return files
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in globlib.glob(os.path.expanduser(path), recursive=True))
        files = [f for f in files if f.is_file() and _wanted(f, suffixes, None)]
        if not files:
            raise UserError(f"{path}: glob matches no data files ({', '.join(suffixes)})")
        return files
    if not _HUB_ID.match(path) or path.lower().endswith(RECORD_SUFFIXES + TEXT_SUFFIXES):
        raise UserError(f"{path}: file not found (check data.path; relative paths start at {Path.cwd()})")
    return None


def _wanted(f: Path, suffixes: tuple[str, ...], root: Path | None) -> bool:
    rel = f.relative_to(root).parts if root is not None else (f.name,)
    # hidden files/dirs (.git, .cache) and our own rejects report never count as data
    return f.name.lower().endswith(suffixes) and not any(part.startswith(".") for part in rel) \
        and f.name != "data_rejects.jsonl"


def _raw_rows(path: str, cfg: DataConfig, rejects: Rejects) -> Iterator[Row]:
    files = resolve_files(path, cfg)
    if files is None:
        yield from read_hub(path, cfg)
        return
    for f in files:
        name = f.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            yield from read_jsonl(f, rejects)
        elif name.endswith(".json"):
            yield from read_json(f, rejects)
        elif name.endswith(".csv"):
            yield from read_csv(f, rejects)
        elif name.endswith(".parquet"):
            yield from read_parquet(f)
        else:
            yield from read_text_file(f, rejects)


def _parse_object(text: str, where: str, rejects: Rejects) -> dict | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        rejects.bad(where, None, f"invalid JSON ({e.msg} at column {e.colno})", {"raw": text[:500]})
        return None
    if not isinstance(obj, dict):
        rejects.bad(where, None, f"row is not a JSON object (got {type(obj).__name__})", {"raw": text[:500]})
        return None
    return obj


def read_jsonl(path: Path, rejects: Rejects) -> Iterator[Row]:
    """One JSON object per line; blank lines are ignored, every other bad line is reported."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    prefix = f"{path}:"
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on line 1 only: editors on Windows write a BOM that json.loads rejects
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                rejects.bad(f"{prefix}{lineno}", None, f"invalid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})",
                            {"raw": raw[:500].decode("utf-8", "replace")})
                continue
            if not text or text.isspace():  # blank: no stripped copy of every line
                continue
            where = f"{prefix}{lineno}"
            obj = _parse_object(text, where, rejects)
            if obj is not None:
                yield Row(where, obj)


def read_json(path: Path, rejects: Rejects) -> Iterator[Row]:
    """A JSON array of objects (the whole file is parsed: JSON arrays cannot be streamed without ijson)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte {data[e.start]:#04x}; re-save the file as UTF-8)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: it is jsonl, read it as such
            yield from read_jsonl(path, rejects)
            return
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, list):
        raise UserError(f"{path}: a .json file must hold a list of objects (got {type(obj).__name__}; "
                        "use .jsonl for one object per line)")
    for i, item in enumerate(obj, start=1):
        where = f"{path}:item {i}"
        if isinstance(item, dict):
            yield Row(where, item)
        else:
            rejects.bad(where, None, f"row is not a JSON object (got {type(item).__name__})", {"raw": item})


def read_csv(path: Path, rejects: Rejects) -> Iterator[Row]:
    """Rows of a csv with a header line; `file:row N` counts data rows from 1 (the header is row 0)."""
    # surrogateescape keeps the stream going past a bad byte so the one bad row can be reported and skipped
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: empty csv (the first row must name the columns)")
        if any(_BAD_BYTE.search(h) for h in header):
            raise UserError(f"{path}:row 0: invalid UTF-8 in the header (re-save the file as UTF-8)")
        for n, values in enumerate(reader, start=1):
            where = f"{path}:row {n}"
            if not values:
                continue  # a blank line
            if len(values) != len(header):
                rejects.bad(where, None, f"row has {len(values)} values, the header has {len(header)}",
                            {"raw": [_clean(v) for v in values]})
                continue
            bad = next((h for h, v in zip(header, values, strict=True) if _BAD_BYTE.search(v)), None)
            if bad is not None:
                rejects.bad(where, bad, f"field '{bad}' is not valid UTF-8",
                            dict(zip(header, (_clean(v) for v in values), strict=True)))
                continue
            yield Row(where, dict(zip(header, values, strict=True)))


def _clean(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_parquet(path: Path, batch_rows: int = 4096) -> Iterator[Row]:
    """Rows of a parquet file, read in record batches (never the whole table)."""
    import pyarrow.parquet as pq  # comes with `datasets`

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError zoo; all mean "not a parquet file"
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for rec in batch.to_pylist():
            n += 1
            yield Row(f"{path}:row {n}", rec)


def read_text_file(path: Path, rejects: Rejects) -> Iterator[Row]:
    """A whole .txt/.md file as one row {"text": content} (format=text)."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    m = _BAD_BYTE.search(text)
    if m is not None:
        line = text.count("\n", 0, m.start()) + 1
        rejects.bad(f"{path}:{line}", None, f"invalid UTF-8 at line {line}", {"raw": _clean(text[:500])})
        return
    yield Row(str(path), {"text": text})


def read_hub(name: str, cfg: DataConfig) -> Iterator[Row]:
    """Rows of a hub dataset via datasets.load_dataset; offline (or no network) fails fast with a UserError."""
    way_out = ("point data.path at a local copy (a jsonl/csv/parquet file or directory, e.g. one written by "
               "`datasets.load_dataset(...).to_json('train.jsonl')` where the hub is reachable)")
    if _offline():
        cause = "not a local file or directory, and the hub is off (HF_HUB_OFFLINE=1)"
    elif not _hub_reachable():
        cause = "not a local file or directory, and the hub cannot be reached"
    else:
        cause = None
    if cause is not None and not _in_cache(name):
        raise UserError(f"{name}: {cause}; {way_out}")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=cfg.split, streaming=cfg.streaming)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"{name}: cannot load hub dataset ({str(e).splitlines()[0]}); {way_out}") from None
    except ValueError as e:  # e.g. unknown split
        raise UserError(f"{name}: {str(e).splitlines()[0]} (check data.split)") from None
    for n, rec in enumerate(ds, start=1):
        yield Row(f"{name}[{cfg.split}]:row {n}", dict(rec))


def _offline() -> bool:
    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v in ("1", "ON", "YES", "TRUE") for v in flags)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: without it `datasets` retries for ~25 s before failing."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _in_cache(name: str) -> bool:
    """Whether `datasets` has this hub dataset in its local cache (then offline loading works)."""
    from datasets import config as dsconfig

    folder = name.replace("/", "___")
    return any(Path(dsconfig.HF_DATASETS_CACHE).glob(f"{folder}*"))
