"""The sources a TextStream draws documents from, each with a small JSON cursor it can seek back to.

`FileSource` reads a source's files in order, epoch after epoch: jsonl line by line (also .jsonl.gz and
.jsonl.zst), text (.txt/.md/.rst/.py) in pieces of about PIECE_BYTES cut at line ends. `HubSource` reads a
hub dataset with `streaming=True`. A cursor is (file index, byte offset, line, epoch); see data/stream.py
for how the stream's state is built from them.
"""

from __future__ import annotations

import gzip
import io
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tunesmith.config import DataConfig, UserError
from tunesmith.data.hub import read_hub
from tunesmith.data.locate import STREAM_TEXT_SUFFIXES
from tunesmith.data.rejects import Rejects
from tunesmith.data.sources import decode_line, parse_object, place, split_lines

PIECE_BYTES = 64 * 1024  # a .txt/.md file is read in pieces of about this size (never whole)


@dataclass
class Piece:
    """Text read from a source: a whole document, or a part of a long .txt/.md file."""

    text: str
    starts: bool  # first piece of its document (BOS, position restart)
    ends: bool  # last piece of its document (EOS)
    where: str


class FileSource:
    """One source's documents in file order, epoch after epoch; `cursor()` is JSON, `seek()` returns to it."""

    def __init__(self, path: str, files: list[Path], text_field: str, rejects: Rejects):
        self.path, self.files, self.text_field, self.rejects = path, files, text_field, rejects
        self.file, self.offset, self.line, self.epoch = 0, 0, 0, 0
        self._handle: io.BufferedIOBase | None = None
        self._pending: deque[bytes] = deque()  # the rest of a chunk cut at lone CRs (split_lines)
        self.seen = 0  # non-blank rows and text pieces read, over all epochs: none at all = empty source

    def cursor(self) -> dict:
        return {"file": self.file, "offset": self.offset, "line": self.line, "epoch": self.epoch}

    def seek(self, cursor: dict) -> None:
        self.close()
        self.file, self.offset, self.line, self.epoch = (
            cursor["file"],
            cursor["offset"],
            cursor["line"],
            cursor["epoch"],
        )

    def close(self) -> None:
        self._pending.clear()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def read(self) -> Piece:
        """The next piece; at the end of the last file the source starts over (epoch + 1)."""
        visited = 0
        while True:
            f = self._open()
            name = self.files[self.file].name.lower()
            piece = self._read_text(f) if name.endswith(STREAM_TEXT_SUFFIXES) else self._read_jsonl(f)
            if piece is not None:
                return piece
            self.close()  # end of this file
            self.file, self.offset, self.line = self.file + 1, 0, 0
            visited += 1
            if self.file == len(self.files):
                self.file, self.epoch = 0, self.epoch + 1
            if visited > len(self.files):
                raise UserError(self._nothing_read())

    @property
    def _report(self) -> Rejects:
        """Where bad rows go: the run's Rejects on the first pass only (later epochs meet the same rows)."""
        return self.rejects if self.epoch == 0 else Rejects(self.rejects.policy)

    def _nothing_read(self) -> str:
        if not self.seen:
            return (
                f"{self.path}: no data rows (every file is empty or holds only blank lines; check data.path)"
            )
        if not self.rejects.count:
            return (
                f"{self.path}: no documents with text in any file (check data.text_field='{self.text_field}')"
            )
        self.rejects.append()
        return (
            f"{self.path}: no documents with text in any file (check data.text_field='{self.text_field}'; "
            f"{self.rejects.count} row{'s' if self.rejects.count > 1 else ''} skipped as bad)"
            f"{self.rejects.note()}"
        )

    def _open(self) -> io.BufferedIOBase:
        if self._handle is None:
            f = self.files[self.file]
            name = f.name.lower()
            # the handle stays open across read() calls (one document each) and is closed by close()
            if name.endswith(".gz"):
                handle = gzip.open(f, "rb")  # noqa: SIM115
            elif name.endswith(".zst"):
                import zstandard

                handle = io.BufferedReader(zstandard.open(f, "rb"))
            else:
                handle = open(f, "rb")  # noqa: SIM115
            if self.offset and not name.endswith((".gz", ".zst")):
                handle.seek(self.offset)
            elif self.offset:  # compressed: decompress up to the offset
                left = self.offset
                while left > 0:
                    chunk = handle.read(min(left, 1 << 20))
                    if not chunk:
                        raise UserError(
                            f"{f}: shorter than the checkpoint's data cursor "
                            "(the file changed; resume with train.resume=never)"
                        )
                    left -= len(chunk)
            self._handle = handle
        return self._handle

    def _next_line(self, f: io.BufferedIOBase) -> bytes | None:
        """The next line (lone CRs end lines too), with offset and line moved past it; None at the end."""
        if not self._pending:
            chunk = f.readline()
            if not chunk:
                return None
            self._pending.extend(split_lines(chunk))
        raw = self._pending.popleft()
        self.offset += len(raw)
        self.line += 1
        return raw

    def _read_jsonl(self, f: io.BufferedIOBase) -> Piece | None:
        path, rejects = self.files[self.file], self._report
        # a byte offset helps only in the file as stored
        plain = not path.name.lower().endswith((".gz", ".zst"))
        while True:
            start = self.offset
            raw = self._next_line(f)
            if raw is None:
                return None
            text = decode_line(raw, path, self.line, start if plain else None, rejects)
            if not text or text.isspace():
                continue
            self.seen += 1
            where = f"{path}:{self.line}"
            obj = parse_object(text, where, rejects)
            if obj is None:
                continue
            doc = obj.get(self.text_field)
            if not isinstance(doc, str) or not doc.strip():
                rejects.bad(
                    where,
                    self.text_field,
                    f"field '{self.text_field}' is missing, empty or not a string (set data.text_field)",
                    {"raw": text[:500]},
                )
                continue
            return Piece(doc, True, True, where)

    def _read_text(self, f: io.BufferedIOBase) -> Piece | None:
        start, first_line = self.offset, self.line + 1
        lines, size = [], 0
        while size < PIECE_BYTES and (raw := f.readline()):
            lines.append(raw)
            size += len(raw)
        if not lines:
            return None
        blob = b"".join(lines)
        self.offset += size
        self.line += place(blob, size)[0] - 1  # line ends in the piece (\n, \r\n or a lone \r)
        self.seen += 1
        path = self.files[self.file]
        ends = not f.peek(1)  # the piece ends its document when nothing follows it in the file
        try:
            text = blob.decode("utf-8-sig" if start == 0 else "utf-8")
        except UnicodeDecodeError as e:
            # utf-8-sig counts after the BOM
            bom = 3 if start == 0 and blob.startswith(b"\xef\xbb\xbf") else 0
            line, col = place(blob, e.start + bom)
            at = (
                f", file offset {start + e.start + bom}"
                if not path.name.lower().endswith((".gz", ".zst"))
                else ""
            )
            self._report.bad(
                f"{path}:{first_line + line - 1}",
                None,
                f"invalid UTF-8 (byte {blob[e.start + bom]:#04x} at column {col}{at}; "
                f"lines {first_line}-{self.line} are skipped)",
            )
            text = ""  # skipped; the empty piece keeps the document's start/end marks (BOS/EOS)
        return Piece(text, start == 0, ends, f"{path}:{first_line}")


class HubSource:
    """A hub dataset read with `datasets.load_dataset(..., streaming=True)`; the cursor counts rows."""

    def __init__(self, name: str, cfg: DataConfig, rejects: Rejects):
        self.path, self.cfg, self.rejects = name, cfg, rejects
        self.offset, self.epoch = 0, 0
        self._rows = None

    def cursor(self) -> dict:
        return {"file": 0, "offset": self.offset, "line": self.offset, "epoch": self.epoch}

    def seek(self, cursor: dict) -> None:
        self.offset, self.epoch, self._rows = cursor["offset"], cursor["epoch"], None

    def close(self) -> None:
        self._rows = None

    def read(self) -> Piece:
        """The next row's text; the dataset restarts at its end (epoch + 1)."""
        for _attempt in range(2):
            if self._rows is None:
                self._rows = islice(read_hub(self.path, self.cfg), self.offset, None)
            for row in self._rows:
                self.offset += 1
                text = row.fields.get(self.cfg.text_field)
                if isinstance(text, str) and text.strip():
                    return Piece(text, True, True, row.where)
                # reported once, not per epoch
                rejects = self.rejects if self.epoch == 0 else Rejects(self.rejects.policy)
                rejects.bad(
                    row.where,
                    self.cfg.text_field,
                    f"field '{self.cfg.text_field}' is missing or empty (set data.text_field)",
                )
            self._rows, self.offset, self.epoch = None, 0, self.epoch + 1
        raise UserError(f"{self.path}: no rows with text (check data.text_field='{self.cfg.text_field}')")
