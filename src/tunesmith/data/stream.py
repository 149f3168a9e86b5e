"""Streaming text for continued pretraining: documents -> tokens on the fly -> full rows of max_length.

Nothing is held in memory but one tokenization batch: sources are read line by line (jsonl, .jsonl.gz,
.jsonl.zst), piece by piece (.txt/.md/.rst/.py trees, 64 KiB pieces cut at line ends) or row by row (hub
datasets with `streaming=True`; data/stream_sources.py). Every document ends with EOS (and starts with BOS
when the tokenizer adds one).
Rows are exactly `max_length` tokens; a document that does not fit continues in the next row.

- `packing: true`: position_ids restart at 0 at each document start (and at each row start), so with
  attention_mask=None and use_cache=False documents never attend to each other.
- `packing: false`: plain contiguous blocks, position_ids 0..T-1, documents see their predecessors
  (GPT-style).

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
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import DataConfig, SourceConfig, UserError
from tunesmith.data.locate import stream_files
from tunesmith.data.rejects import Rejects
from tunesmith.data.stream_sources import FileSource, HubSource

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
        # under skip, each skipped row is appended to <out_dir>/data_rejects.jsonl as it is met (no out_dir:
        # kept here)
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
        """The next micro-batch: input_ids, labels, position_ids (B, T), real_tokens; and document places."""
        input_ids = torch.empty((self.batch_size, self.seq_len), dtype=torch.long)
        position_ids = torch.empty_like(input_ids)
        wheres: list[str] = []
        for r in range(self.batch_size):
            self._row(input_ids[r], position_ids[r], wheres)
        if not self.packing:
            # contiguous blocks: documents see their predecessors
            position_ids[:] = torch.arange(self.seq_len)
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
