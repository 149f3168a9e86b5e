"""Locating data: the one resolver of a file, directory tree, glob or hub id, for every reader.

`find_files` is shared by the record readers (data/sources.py, through `resolve_files`) and the text
stream (data/stream.py, through `stream_files`), so a tree or glob means the same files to both: sorted,
only the reader's suffixes, never hidden files or dirs nor our own rejects report.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from pathlib import Path

from tunesmith.config import DataConfig, UserError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
TEXT_SUFFIXES = (".txt", ".md")
# what data/stream.py streams: jsonl (also zstd) and text, source code included (continued pretraining
# on a codebase)
STREAM_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
STREAM_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
# every suffix a reader takes: a missing path that ends in one is a missing file, never a hub id
FILE_SUFFIXES = tuple(
    dict.fromkeys((*RECORD_SUFFIXES, *TEXT_SUFFIXES, *STREAM_JSONL_SUFFIXES, *STREAM_TEXT_SUFFIXES))
)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_files(path: str, cfg: DataConfig) -> list[Path] | None:
    """The sorted local files read_rows reads behind `path` (suffixes per cfg.format); None for a hub id."""
    return find_files(path, TEXT_SUFFIXES + RECORD_SUFFIXES if cfg.format == "text" else RECORD_SUFFIXES)


def stream_files(path: str, key: str = "data.path") -> list[Path] | None:
    """The sorted files a stream reads behind a file, directory tree or glob, or None for a hub id."""
    suffixes = STREAM_JSONL_SUFFIXES + STREAM_TEXT_SUFFIXES
    files = find_files(path, suffixes, key)
    # a file named outright comes back whatever its suffix; the stream reads anything not text as jsonl
    if files is not None and not files[0].name.lower().endswith(suffixes):
        raise UserError(f"{path}: streaming reads {', '.join(suffixes)} files (rename it or convert it)")
    return files


def find_files(path: str, suffixes: tuple[str, ...], key: str = "data.path") -> list[Path] | None:
    """The sorted data files behind a file, directory tree or glob, or None when `path` names a hub dataset.

    A file named outright is taken whatever its suffix; in a directory or a glob only `suffixes` count, and
    never hidden files or dirs (.git, .cache) nor our own rejects report. `key` is the config key to check.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and _is_data(f, suffixes, f.relative_to(p).parts)
        )
        what = "directory holds"
    elif any(c in path for c in "*?["):
        files = sorted(Path(f) for f in globlib.glob(os.path.expanduser(path), recursive=True))
        files = [f for f in files if f.is_file() and _is_data(f, suffixes, (f.name,))]
        what = "glob matches"
    elif is_hub_id(path):
        return None
    else:
        raise UserError(f"{path}: file not found (check {key}; relative paths start at {Path.cwd()})")
    if not files:
        raise UserError(f"{path}: {what} no data files ({', '.join(suffixes)})")
    return files


def is_hub_id(path: str) -> bool:
    """Whether `path`, which is no local file, names a hub dataset: `name` or `org/name`, no file suffix."""
    return bool(_HUB_ID.match(path)) and not path.lower().endswith(FILE_SUFFIXES)


def _is_data(f: Path, suffixes: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    # hidden files/dirs (.git, .cache) and our own rejects report never count as data
    return (
        f.name.lower().endswith(suffixes)
        and not any(part.startswith(".") for part in parts)
        and f.name != "data_rejects.jsonl"
    )
