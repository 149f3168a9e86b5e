"""Packing and batching: samples -> micro-batches of tensors.

Packed rows hold several samples; `position_ids` restart at 0 at each sample, and the forward runs with
attention_mask=None and use_cache=False, which is how transformers (5.x, SDPA and eager) detects packed
sequences and keeps samples from attending to each other. Without that, the padding collator is used.
"""

from __future__ import annotations

import bisect
import random

import torch

from tunesmith.data.render import IGNORE


def pack(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing: sample indices grouped into rows whose total length is <= seq_len.

    >>> pack([5, 3, 2, 4], 8)
    [[0, 1], [3, 2]]
    """
    # Longest first, ties by index: reverse=True keeps the sort stable.
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    bins: list[list[int]] = []
    # Open bins as space_left << 32 | bin_index (one int compares faster than a tuple), kept sorted so the
    # tightest bin that fits is one bisect away.
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"sample {i} has {n} tokens > seq_len {seq_len}; truncate before packing")
        k = bisect.bisect_left(free, n << 32)
        if k < len(free):
            key = free.pop(k)
            space, b = key >> 32, key & 0xFFFFFFFF
        else:
            space, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if space > n:
            bisect.insort(free, (space - n) << 32 | b)
    return bins


def epoch_batches(
    lengths: list[int], batch_size: int, seq_len: int, packing: bool, seed: int, epoch: int
) -> list[list[list[int]]]:
    """One epoch's micro-batches: a list of batches, each a list of rows, each a list of sample indices.

    Deterministic in (seed, epoch), so a resumed run rebuilds the same list and skips to its cursor.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if packing:
        rows = pack(lengths, seq_len)
    else:
        rows = [[i] for i in range(len(lengths))]
    rng.shuffle(rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def collate_packed(samples: list[dict], rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of sample indices -> input_ids, labels, position_ids, each (B, T) with T = longest row."""
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    # Padding positions count up from 0 like one more (fully masked) sample, so it never joins a real one.
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            ids, lab = samples[i]["input_ids"], samples[i]["labels"]
            n = len(ids)
            input_ids[r, t : t + n] = torch.tensor(ids)
            labels[r, t : t + n] = torch.tensor(lab)
            position_ids[r, t : t + n] = torch.arange(n)
            t += n
        position_ids[r, t:] = torch.arange(width - t)
    real = sum(len(samples[i]["input_ids"]) for row in rows for i in row)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "real_tokens": torch.tensor(real),
    }


def collate_padded(
    samples: list[dict], rows: list[list[int]], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """One sample per row, padded to the longest; padding is masked by position (attention_mask, labels)."""
    seqs = [samples[row[0]] for row in rows]
    width = max(len(s["input_ids"]) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s["input_ids"])
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[r, sl] = torch.tensor(s["input_ids"])
        labels[r, sl] = torch.tensor(s["labels"])
        mask[r, sl] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "real_tokens": mask.sum()}


def collate(
    samples: list[dict], rows: list[list[int]], pad_id: int, packing: bool
) -> dict[str, torch.Tensor]:
    """The training collator: packed when packing is on, right-padded otherwise."""
    return collate_packed(samples, rows, pad_id) if packing else collate_padded(samples, rows, pad_id)


class EpochStream:
    """Endless micro-batches over in-memory samples, epoch after epoch, with a resumable cursor.

    The cursor is (epoch, index into that epoch's batch list); `epoch_batches` rebuilds the list from the
    seed, so the state to checkpoint is two integers. Under DDP every rank walks the same global list and
    takes the micro-batches `rank, rank + world, ...` of each step.
    """

    def __init__(
        self, samples: list[dict], batch_size: int, seq_len: int, packing: bool, seed: int, pad_id: int
    ):
        self.samples, self.batch_size, self.seq_len = samples, batch_size, seq_len
        self.packing, self.seed, self.pad_id = packing, seed, pad_id
        self.lengths = [len(s["input_ids"]) for s in samples]
        self.epoch, self.index = 0, 0
        self._batches = epoch_batches(self.lengths, batch_size, seq_len, packing, seed, 0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def next(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The next micro-batch and the `where` of every sample in it (to name a bad batch)."""
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = epoch_batches(
                self.lengths, self.batch_size, self.seq_len, self.packing, self.seed, self.epoch
            )
        rows = self._batches[self.index]
        self.index += 1
        wheres = [self.samples[i].get("where", str(i)) for row in rows for i in row]
        return collate(self.samples, rows, self.pad_id, self.packing), wheres

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._batches = epoch_batches(
            self.lengths, self.batch_size, self.seq_len, self.packing, self.seed, self.epoch
        )
