"""Hub datasets: rows of `datasets.load_dataset`, failing fast and in one line when the hub is out of reach.

Kept apart from the file readers (data/sources.py): the hub is the only reader that talks to the network.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from tunesmith.config import DataConfig, UserError
from tunesmith.data.rejects import first_line
from tunesmith.data.row import Row
from tunesmith.runtime import hub_offline


def read_hub(name: str, cfg: DataConfig) -> Iterator[Row]:
    """Rows of a hub dataset via datasets.load_dataset; offline (or no network): a UserError at once."""
    way_out = (
        "point data.path at a local copy (a jsonl/csv/parquet file or directory, e.g. one written by "
        "`datasets.load_dataset(...).to_json('train.jsonl')` where the hub is reachable)"
    )
    if hub_offline():
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
        raise UserError(f"{name}: cannot load hub dataset ({first_line(e)}); {way_out}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # its files do not parse (bad UTF-8, bad JSON...)
        raise UserError(
            f"{name}: cannot read the hub dataset's files ({first_line(e.__cause__ or e)})"
        ) from None
    except ValueError as e:  # e.g. unknown split
        raise UserError(f"{name}: {first_line(e)} (check data.split)") from None
    rows, n = iter(ds), 0
    while True:
        try:
            rec = next(rows, None)
        # streaming parses the hub's files as it goes: bad UTF-8 or JSON (ValueErrors) and I/O surface here
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            raise UserError(
                f"{name}[{cfg.split}]:row {n + 1}: cannot read the hub dataset past row {n} ({first_line(e)})"
            ) from None
        if rec is None:
            return
        n += 1
        yield Row(f"{name}[{cfg.split}]:row {n}", dict(rec))


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
