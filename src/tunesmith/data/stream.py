"""Streaming text for continued pretraining: documents -> tokens on the fly -> full rows of max_length.

Nothing is held in memory but one tokenization batch: sources are read line by line (jsonl, .jsonl.gz,
.jsonl.zst), piece by piece (.txt/.md/.rst/.py trees, 64 KiB pieces cut at line ends) or row by row (hub datasets
with `streaming=True`). Every document ends with EOS (and starts with BOS when the tokenizer adds one).
Rows are exactly `max_length` tokens; a document that does not fit continues in the next row.

- `packing: true`: position_ids restart at 0 at each document start (and at each row start), so with
  attention_mask=None and use_cache=False documents never attend to each other.
- `packing: false`: plain contiguous blocks, position_ids 0..T-1, documents see their predecessors (GPT-style).

Mixing: `data.sources: [{path, weight}]`; before each document a source is drawn with probability
weight / sum(weights). The draw k uses a counter-based hash of (seed, k), so the RNG state is one integer.

Resume: `state()` names the first document not yet fully emitted: the draw counter and every source's
cursor (file index, byte offset, line, epoch) just before that document was read, plus how many of its
tokens were already emitted. `load_state` seeks there (plain files: one seek; compressed: a re-read to the
offset; hub: rows skipped), re-tokenizes that document and drops the emitted tokens, so the next batch is
exactly the one an uninterrupted stream would have produced. The state is a few hundred bytes of JSON.

With several ranks, every rank builds the same global stream; the loop keeps micro-batches k % world ==
rank, as it does with `EpochStream`.
"""

from __future__ import annotations

import bisect
import gzip
import io
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from tunesmith.config import DataConfig, SourceConfig, UserError
from tunesmith.data.hub import read_hub
from tunesmith.data.rejects import Rejects
from tunesmith.data.sources import (
    STREAM_JSONL_SUFFIXES,
    STREAM_TEXT_SUFFIXES,
    decode_line,
    find_files,
    parse_object,
    place,
    split_lines,
)

PIECE_BYTES = 64 * 1024  # a .txt/.md file is read in pieces of about this size (never whole)
TOKENIZE_BATCH = 64  # documents tokenized together by the fast tokenizer
_MASK64 = (1 << 64) - 1


def uniform(seed: int, k: int) -> float:
    """The k-th draw in [0, 1) of a counter-based generator (splitmix64): no state but k.

    >>> uniform(0, 1) == uniform(0, 1) and uniform(0, 1) != uniform(0, 2)
    True
    """
    z = (seed * 0x9E3779B97F4A7C15 + (k + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def stream_files(path: str, key: str = "data.path") -> list[Path] | None:
    """The sorted files a stream reads behind a file, directory tree or glob (sources.find_files), or None for a hub id."""
    suffixes = STREAM_JSONL_SUFFIXES + STREAM_TEXT_SUFFIXES
    files = find_files(path, suffixes, key)
    # a file named outright comes back whatever its suffix; the stream reads anything not text as jsonl
    if files is not None and not files[0].name.lower().endswith(suffixes):
        raise UserError(f"{path}: streaming reads {', '.join(suffixes)} files (rename it or convert it)")
    return files


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
        """Where bad rows go: the run's Rejects on the first pass only, as later epochs meet the same rows again."""
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
            f"{self.rejects.count} row{'s' if self.rejects.count > 1 else ''} skipped as bad){self.rejects.note()}"
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
                            f"{f}: shorter than the checkpoint's data cursor (the file changed; resume with train.resume=never)"
                        )
                    left -= len(chunk)
            self._handle = handle
        return self._handle

    def _next_line(self, f: io.BufferedIOBase) -> bytes | None:
        """The next line (lone CRs end lines too), with offset and line moved past it; None at the end of the file."""
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
        plain = not path.name.lower().endswith(
            (".gz", ".zst")
        )  # a byte offset helps only in the file as stored
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
            bom = (
                3 if start == 0 and blob.startswith(b"\xef\xbb\xbf") else 0
            )  # utf-8-sig counts after the BOM
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
                rejects = (
                    self.rejects if self.epoch == 0 else Rejects(self.rejects.policy)
                )  # reported once, not per epoch
                rejects.bad(
                    row.where,
                    self.cfg.text_field,
                    f"field '{self.cfg.text_field}' is missing or empty (set data.text_field)",
                )
            self._rows, self.offset, self.epoch = None, 0, self.epoch + 1
        raise UserError(f"{self.path}: no rows with text (check data.text_field='{self.cfg.text_field}')")


@dataclass
class Unit:
    """A tokenized piece waiting in the buffer, with the stream cursor just before it was read."""

    ids: list[int]
    starts: bool
    where: str
    cursor: dict


class TextStream:
    """Endless micro-batches of packed text rows from streamed sources, with a small resumable JSON state."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        out_dir: str | Path | None = None,
    ):
        specs = cfg.sources or [SourceConfig(path=cfg.path)]
        self.paths = [s.path for s in specs]
        total = sum(s.weight for s in specs)
        self._cum = [sum(s.weight for s in specs[: i + 1]) / total for i in range(len(specs))]
        # under skip, each skipped row is appended to <out_dir>/data_rejects.jsonl as it is met (no out_dir: kept here)
        self.rejects = Rejects(cfg.on_bad_row, out_dir)
        self.sources = [self._source(s.path, cfg) for s in specs]
        self.tok, self.batch_size, self.seq_len, self.packing, self.seed = (
            tokenizer,
            batch_size,
            cfg.max_length,
            cfg.packing,
            seed,
        )
        self.rank, self.world = rank, world  # every rank yields the same global stream (see module docstring)
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise UserError(
                "model tokenizer has no EOS token: streaming text needs one to separate documents"
            )
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else None
        self.draws, self.index = 0, 0
        self.units: deque[Unit] = deque()
        self.skip, self.buffered = 0, 0  # tokens of units[0] already emitted; tokens waiting in the buffer

    def _source(self, path: str, cfg: DataConfig) -> FileSource | HubSource:
        files = stream_files(path, "data.sources" if cfg.sources else "data.path")
        return (
            HubSource(path, cfg, self.rejects)
            if files is None
            else FileSource(path, files, cfg.text_field, self.rejects)
        )

    @property
    def batches_per_epoch(self) -> int:
        raise UserError(
            "train.max_steps: a streaming run (data.streaming=true) has no epoch length; set train.max_steps"
        )

    @property
    def epoch(self) -> int:
        """Passes completed over the slowest source, at the first document not yet emitted (for logs)."""
        cursor = self.units[0].cursor if self.units else self._cursor()
        return min(c["epoch"] for c in cursor["sources"])

    def _cursor(self) -> dict:
        return {"draws": self.draws, "sources": [s.cursor() for s in self.sources]}

    def _fill(self, need: int) -> None:
        """Read and tokenize documents until at least `need` tokens wait in the buffer."""
        while self.buffered - self.skip < need:
            pieces, cursors = [], []
            for _ in range(TOKENIZE_BATCH):
                cursors.append(self._cursor())
                u = uniform(self.seed, self.draws)
                self.draws += 1
                pieces.append(
                    self.sources[min(bisect.bisect_right(self._cum, u), len(self.sources) - 1)].read()
                )
            for piece, ids, cursor in zip(
                pieces, self._tokenize([p.text for p in pieces]), cursors, strict=True
            ):
                ids = (
                    ([self.bos] if piece.starts and self.bos is not None else [])
                    + ids
                    + ([self.eos] if piece.ends else [])
                )
                if ids:
                    self.units.append(Unit(ids, piece.starts, piece.where, cursor))
                    self.buffered += len(ids)
            self.rejects.append()

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: ~30% faster than the Python wrapper
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _row(self, input_ids: torch.Tensor, position_ids: torch.Tensor, wheres: list[str]) -> None:
        """Fill one row (T,) of ids and positions from the front of the buffer."""
        self._fill(self.seq_len)
        t, pos = 0, 0
        while t < self.seq_len:
            unit = self.units[0]
            n = min(len(unit.ids) - self.skip, self.seq_len - t)
            if t == 0 or (self.skip == 0 and unit.starts):
                pos = 0  # a row start or a document start: a new attention segment
            input_ids[t : t + n] = torch.tensor(unit.ids[self.skip : self.skip + n])
            position_ids[t : t + n] = torch.arange(pos, pos + n)
            wheres.append(unit.where)
            t, pos, self.skip = t + n, pos + n, self.skip + n
            if self.skip == len(unit.ids):
                self.units.popleft()
                self.buffered -= len(unit.ids)
                self.skip = 0

    def next(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The next micro-batch: input_ids, labels, position_ids (B, T) and real_tokens; plus document places."""
        input_ids = torch.empty((self.batch_size, self.seq_len), dtype=torch.long)
        position_ids = torch.empty_like(input_ids)
        wheres: list[str] = []
        for r in range(self.batch_size):
            self._row(input_ids[r], position_ids[r], wheres)
        if not self.packing:
            position_ids[:] = torch.arange(
                self.seq_len
            )  # contiguous blocks: documents see their predecessors
        self.index += 1
        batch = {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "position_ids": position_ids,
            "real_tokens": torch.tensor(input_ids.numel()),
        }
        return batch, list(dict.fromkeys(wheres))

    def state(self) -> dict:
        """Small JSON: where the first not-fully-emitted document starts, and how much of it was emitted."""
        cursor = self.units[0].cursor if self.units else self._cursor()
        return {"epoch": self.epoch, "index": self.index, "paths": self.paths, "skip": self.skip, **cursor}

    def load_state(self, state: dict) -> None:
        """Continue exactly where `state()` was taken."""
        if state.get("paths") != self.paths:
            raise UserError(
                f"data cursor in the checkpoint is for sources {state.get('paths')}, not {self.paths} "
                "(resume with the same data.path/data.sources, or train.resume=never)"
            )
        for source, cursor in zip(self.sources, state["sources"], strict=True):
            source.seek(cursor)
        self.draws, self.index = state["draws"], state["index"]
        self.units.clear()
        self.buffered, self.skip = 0, 0
        if state["skip"]:
            self._fill(state["skip"])
            self.skip = state["skip"]
