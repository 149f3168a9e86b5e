"""build(cfg, tokenizer, out_dir) -> Prepared: the one call training and eval make to get their data.

read rows -> to_example -> (dedupe) -> split (or data.test_path) -> data.limit -> render -> write rejects.
data.limit=auto: train renders (and caches) the whole pool, sizes it to train.time_budget and records the
number of pairs it trained on in `<out_dir>/data/limit.json`; every later build (compare, eval, serve.rag,
data inspect) takes that many, so each stage sees exactly the pairs trained.
The tokenized splits are cached in `<out_dir>/data/` under a key of (data files' size+mtime, the data
config that changes the samples, the template, the tokenizer): `prepare` writes them, `build` reuses them
when the key matches. Storage is numpy `.npz` (flat ids + offsets, loaded with allow_pickle=False) plus
jsonl for examples: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from tunesmith.config import Config, DataConfig, UserError
from tunesmith.data.formats import Example, Template, get_template, prompt_key, to_example
from tunesmith.data.locate import resolve_files, stream_files
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import gc_paused, render
from tunesmith.data.sources import read_rows
from tunesmith.data.split import split
from tunesmith.runtime import print0

CACHE_DIR = "data"
LIMIT_FILE = "limit.json"  # <out_dir>/data/limit.json: data.limit=auto as train resolved it
# data.limit=auto in a build: "pool" (train, before it sizes), "recorded" (eval and serve: train first),
# "recorded_or_pool" (data inspect and plan: the trained pairs once there are some, else the pool)
AutoLimit = Literal["pool", "recorded", "recorded_or_pool"]
# Data config fields that change the samples (packing/streaming change only how they are batched/read).
_KEY_FIELDS = (
    "path",
    "format",
    "template",
    "fields",
    "split",
    "max_length",
    "truncation",
    "test_size",
    "test_path",
    "seed",
    "limit",
    "on_bad_row",
    "dedupe",
    "text_field",
)
_FORMAT_VERSION = 2  # bump when the cache layout or the rendering rules change


@dataclass
class Prepared:
    """Rendered splits (samples = {input_ids, labels, where}) plus the examples they came from."""

    train: list[dict]
    test: list[dict]
    train_examples: list[Example]
    test_examples: list[Example]
    template: Template
    rejected: int
    data_hash: str
    template_hash: str


def build(
    cfg: Config, tokenizer, out_dir: str | Path | None = None, auto: AutoLimit = "recorded"
) -> Prepared:
    """Read, validate, split and render the data; reuse/write the cache in <out_dir>/data given out_dir.

    data.limit=auto: the cache holds the whole pool; `auto` says whether to take the recorded number of
    pairs from it (module docstring)."""
    pool = _build(cfg, tokenizer, out_dir)
    if cfg.data.limit != "auto":
        return pool
    n = recorded_limit(out_dir, pool.train_examples, auto)
    return pool if n is None else first_examples(pool, n)


def _build(cfg: Config, tokenizer, out_dir: str | Path | None) -> Prepared:
    d = cfg.data
    template = get_template(d.template, d.format)
    cache = Path(out_dir) / CACHE_DIR if out_dir is not None else None
    key = cache_key(d, template, tokenizer)
    if cache is not None:
        hit = load_cache(cache, key, template)
        if hit is not None:
            return hit
    rejects = Rejects(d.on_bad_row, out_dir)
    train_ex, test_ex = load_examples(d, rejects, auto="pool")
    train = render_all(train_ex, template, tokenizer, d.max_length, d.truncation, rejects)
    test = render_all(test_ex, template, tokenizer, d.max_length, d.truncation, rejects)
    _require_rendered(train, train_ex, d.path, "training", rejects)
    _require_rendered(test, test_ex, d.test_path or d.path, "test", rejects)
    rejects.write()
    if rejects.count:
        print0(f"data: {rejects.summary()}")
    prepared = Prepared(
        train,
        test,
        train_ex,
        test_ex,
        template,
        rejects.count,
        data_hash=data_hash(d),
        template_hash=template_hash(template),
    )
    if cache is not None:
        save_cache(cache, key, prepared)
    return prepared


def render_all(
    examples: list[Example], template: Template, tokenizer, max_length: int, truncation: str, rejects: Rejects
) -> list[dict]:
    """render(), also for an empty split (a fast tokenizer cannot encode an empty batch)."""
    return render(examples, template, tokenizer, max_length, truncation, rejects) if examples else []


def _require_rendered(
    samples: list[dict], examples: list[Example], path: str, side: str, rejects: Rejects
) -> None:
    """Raise (after writing the report) when rendering dropped every example of a non-empty split."""
    if examples and not samples:
        raise emptied(
            rejects,
            f"{path}: all {len(examples)} {side} examples were skipped while rendering "
            "(nothing left of them within data.max_length)",
        )


def emptied(rejects: Rejects, message: str) -> UserError:
    """The error for a step that left no rows, with the rejects report written first so it can be read."""
    rejects.write()
    return UserError(message + rejects.note())


def build_heldout(cfg: Config, tokenizer, out_dir: str | Path | None = None) -> Prepared:
    """For streaming runs: only the held-out data.test_path is rendered (the corpus itself is streamed)."""
    d = cfg.data
    template = get_template(d.template, d.format)
    rejects = Rejects(d.on_bad_row, out_dir)
    test_ex = read_examples(d.test_path, d, rejects) if d.test_path else []
    test = render_all(test_ex, template, tokenizer, d.max_length, d.truncation, rejects)
    _require_rendered(test, test_ex, d.test_path or "", "test", rejects)
    rejects.write()
    return Prepared(
        [],
        test,
        [],
        test_ex,
        template,
        rejects.count,
        data_hash=data_hash(d),
        template_hash=template_hash(template),
    )


def prepare(cfg: Config, tokenizer) -> Path:
    """Build the splits and write them to <out_dir>/data/ (reused by training); returns that directory."""
    build(cfg, tokenizer, cfg.out_dir)
    return Path(cfg.out_dir) / CACHE_DIR


def read_examples(path: str, d: DataConfig, rejects: Rejects) -> list[Example]:
    """Rows of one source -> validated Examples (bad rows go to `rejects`); none left is an error."""
    out, before = [], rejects.count
    with gc_paused():
        for row in read_rows(path, d, rejects):  # raises on a source without rows
            ex = to_example(row, d.format, rejects)
            if ex is not None:
                out.append(ex)
    if not out:  # rows were read (read_rows saw to that), and every one was bad
        n = rejects.count - before
        raise emptied(
            rejects,
            f"{path}: " + ("its only row was" if n == 1 else f"all {n} rows were") + " skipped as bad",
        )
    return out


def load_examples(
    d: DataConfig, rejects: Rejects, auto: AutoLimit = "recorded_or_pool"
) -> tuple[list[Example], list[Example]]:
    """(train, test) Examples: deduped if asked, split (or data.test_path), then data.limit on train.

    data.limit=auto is looked up in the run dir the rejects go to (`rejects.out_dir`, the out_dir of data
    inspect, which calls this directly); `auto` as in `build`.

    No step may empty a side that is asked for: read_examples and split raise, dedupe keeps the first of each
    group and data.limit is >= 1, so train (and test when test_size > 0 or test_path is set) is never empty.
    """
    examples = read_examples(d.path, d, rejects)
    if d.dedupe:
        examples = dedupe(examples, rejects)
    if d.test_path:
        train, test = examples, read_examples(d.test_path, d, rejects)
        if d.dedupe:
            test = dedupe(test, rejects)
    else:
        train, test = split(examples, d.test_size, d.seed, prompt_key, name=d.path)
    limit = recorded_limit(rejects.out_dir, train, auto) if d.limit == "auto" else d.limit
    if limit is not None:
        train = train[:limit]
    return train, test


def recorded_limit(out_dir: str | Path | None, pool: list[Example], auto: AutoLimit) -> int | None:
    """data.limit=auto resolved: the number of pairs train recorded, or None (the whole pool)."""
    path = Path(out_dir) / CACHE_DIR / LIMIT_FILE if out_dir is not None else None
    if auto == "pool":
        return None
    if path is None or not path.is_file():
        if auto == "recorded_or_pool":
            return None
        raise UserError(
            f"data.limit=auto: no run has been sized in {out_dir} yet (train writes {path} when it sizes "
            "the data to train.time_budget): train first"
        )
    rec = json.loads(path.read_text())
    n = rec["examples"]
    if rec["pool"] != len(pool) or pool[n - 1].where != rec["last_where"]:
        raise UserError(
            f"{path}: data.limit=auto was sized on other data ({rec['pool']} training pairs, now "
            f"{len(pool)}); train again"
        )
    return n


def save_limit(out_dir: str | Path, pool: Prepared, n: int) -> Path:
    """Record data.limit=auto's resolved n (the first n training pairs of `pool`) for every later build."""
    path = Path(out_dir) / CACHE_DIR / LIMIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"examples": n, "pool": len(pool.train_examples), "last_where": pool.train_examples[n - 1].where}
    path.write_text(json.dumps(rec))
    return path


def first_examples(p: Prepared, n: int) -> Prepared:
    """`p` with only its first n training examples and their samples (as data.limit=n would build it)."""
    keep = p.train_examples[:n]
    wheres = {ex.where for ex in keep}
    return replace(p, train=[s for s in p.train if s["where"] in wheres], train_examples=keep)


def dedupe(examples: list[Example], rejects: Rejects) -> list[Example]:
    """Drop exact duplicates (normalized text); each one is recorded as 'duplicate of <where>'."""
    from tunesmith.data.checks import example_text
    from tunesmith.data.split import normalize_text

    first: dict[str, str] = {}
    kept = []
    for ex in examples:
        k = normalize_text(example_text(ex))
        if k in first:
            # recorded, never raised: with dedupe on, a duplicate is expected, not a bad row
            rejects.record(ex.where, None, f"duplicate of {first[k]}", asdict(ex))
        else:
            first[k] = ex.where
            kept.append(ex)
    return kept


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stats(path: str | None, d: DataConfig) -> list:
    if not path:
        return []
    files = resolve_files(path, d)
    if files is None:  # a hub dataset: its id and split are all we know without downloading
        return [path, d.split]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _read_sources(d: DataConfig) -> list[tuple[str, list[Path] | None]]:
    """(path, its files or None for a hub id) of everything the run reads: the streamed sources (with the
    stream's own suffixes) or data.path, then data.test_path."""
    if d.streaming:
        specs = [s.path for s in d.sources] if d.sources else [d.path]
        out = [(path, stream_files(path, "data.sources" if d.sources else "data.path")) for path in specs]
    else:
        out = [(d.path, resolve_files(d.path, d))]
    if d.test_path:
        out.append((d.test_path, resolve_files(d.test_path, d)))
    return out


def data_hash(d: DataConfig) -> str:
    """sha256 of the contents of every file the run reads (train or streamed sources, then test_path), for the
    run manifest and the resume guard; a hub dataset counts by its id and split."""
    h = hashlib.sha256()
    for path, files in _read_sources(d):
        if files is None:
            h.update(f"hub:{path}:{d.split}".encode())
            continue
        for f in files:
            h.update(str(f.name).encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:16]


def template_hash(template: Template) -> str:
    """A short hash of the template (format, kind, strings): part of the manifest and the cache key."""
    return _hash(template.to_dict())


def tokenizer_hash(tokenizer) -> str:
    """A hash of what in the tokenizer changes ids: the full fast-tokenizer JSON, specials, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    core = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _hash(
        [
            core,
            tokenizer.eos_token,
            tokenizer.bos_token,
            tokenizer.pad_token,
            getattr(tokenizer, "chat_template", None),
            type(tokenizer).__name__,
        ]
    )


def cache_key(d: DataConfig, template: Template, tokenizer) -> str:
    """The cache key of the rendered splits."""
    conf = {k: getattr(d, k) for k in _KEY_FIELDS}
    return _hash(
        [
            _FORMAT_VERSION,
            conf,
            _file_stats(d.path, d),
            _file_stats(d.test_path, d),
            template.to_dict(),
            tokenizer_hash(tokenizer),
        ]
    )


def _save_samples(path: Path, samples: list[dict]) -> None:
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for s in samples for t in s["input_ids"]), dtype=np.int64, count=int(offsets[-1]))
    labels = np.fromiter((t for s in samples for t in s["labels"]), dtype=np.int64, count=int(offsets[-1]))
    np.savez(path, input_ids=ids, labels=labels, offsets=offsets)


def _load_samples(path: Path, wheres: list[str]) -> list[dict]:
    with np.load(path, allow_pickle=False) as z:
        ids, labels, off = z["input_ids"].tolist(), z["labels"].tolist(), z["offsets"].tolist()
    return [
        {"input_ids": ids[off[i] : off[i + 1]], "labels": labels[off[i] : off[i + 1]], "where": w}
        for i, w in enumerate(wheres)
    ]


def save_cache(cache: Path, key: str, p: Prepared) -> None:
    """Write both splits, their examples and meta.json (written last: it marks the cache complete)."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "meta.json").unlink(missing_ok=True)
    for name, samples, examples in (("train", p.train, p.train_examples), ("test", p.test, p.test_examples)):
        _save_samples(cache / f"{name}.npz", samples)
        with (cache / f"{name}_examples.jsonl").open("w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")
    meta = {
        "key": key,
        "rejected": p.rejected,
        "data_hash": p.data_hash,
        "template_hash": p.template_hash,
        "template": p.template.to_dict(),
        "train_where": [s["where"] for s in p.train],
        "test_where": [s["where"] for s in p.test],
    }
    (cache / "meta.json").write_text(json.dumps(meta))


def load_cache(cache: Path, key: str, template: Template) -> Prepared | None:
    """The cached Prepared when <cache>/meta.json has this key, else None."""
    meta_path = cache / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        return None

    def examples(name: str) -> list[Example]:
        with (cache / f"{name}_examples.jsonl").open(encoding="utf-8") as f:
            return [Example(**json.loads(line)) for line in f]

    return Prepared(
        train=_load_samples(cache / "train.npz", meta["train_where"]),
        test=_load_samples(cache / "test.npz", meta["test_where"]),
        train_examples=examples("train"),
        test_examples=examples("test"),
        template=template,
        rejected=meta["rejected"],
        data_hash=meta["data_hash"],
        template_hash=meta["template_hash"],
    )
