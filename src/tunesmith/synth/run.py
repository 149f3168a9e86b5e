"""The synth run: which side each chunk goes to, asking in rounds, appending to the files, the report.

Files written next to `--out qa.jsonl` (one chunk's pairs all go to one side, chosen by a hash of the
chunk id with synth.test_size, like data/split.py):
- `qa.jsonl`: train pairs, `qa.test.jsonl`: test pairs; `qa` schema + provenance `source`, `chunk`,
  `generator`
- `qa.rejected.jsonl`: every dropped pair (and each chunk's unparseable output) with its `reason` (the
  filter), `side`, `source`, `chunk` and `generator`: nothing generated is lost
- `qa.done.jsonl`: one line per finished chunk (also those whose pairs were all dropped)
- `qa.report.json`: counts per filter with examples (also printed)
Appends are the only writes, so an interrupted run resumes: chunks named in qa.done.jsonl or in the
outputs' `chunk` field are skipped, and kept questions are reloaded so no duplicate is written again.
A run that leaves no kept pair on either side (train or test file) is a UserError naming the count per
filter: the generator or the filters must change; the rejected pairs stay on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import Config, SynthConfig, UserError
from tunesmith.data.documents import Chunk, chunk_documents, find_documents
from tunesmith.data.split import split_hash
from tunesmith.synth.generators import Generator, conversation, make_generator
from tunesmith.synth.pairs import FILTERS, Questions, parse_pairs, verdict


def held_out_chunks(chunks: list[Chunk], test_size: float, seed: int) -> set[str]:
    """Chunks whose pairs go to the test side: hash(id) / 2**64 < test_size (stable as chunks are added,
    like data/split.py); at least one chunk stays on the train side."""
    h = {c.id: split_hash(c.id, seed) for c in chunks}
    test = {i for i, v in h.items() if v < test_size * 2**64}
    if test and len(test) == len(h):
        test.discard(max(h, key=h.get))
    return test


def output_paths(out: Path) -> dict[str, Path]:
    """qa.jsonl -> {train: qa.jsonl, test: qa.test.jsonl, rejected: qa.rejected.jsonl, done: qa.done.jsonl,
    report: qa.report.json}."""
    return {
        "train": out,
        "test": out.with_suffix(".test.jsonl"),
        "rejected": out.with_suffix(".rejected.jsonl"),
        "done": out.with_suffix(".done.jsonl"),
        "report": out.with_suffix(".report.json"),
    }


def read_appended(path: Path) -> list[dict]:
    """Rows of an append-only jsonl; a last line cut short by a kill is removed from the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def ask(
    gen: Generator, chunks: list[Chunk], s: SynthConfig, report: dict
) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """(pairs per chunk id, last output per chunk id whose output never parsed); output that does not parse is
    asked again up to synth.max_retries times."""
    parsed, pending, last = {}, list(chunks), {}
    for attempt in range(s.max_retries + 1):
        if not pending:
            break
        style = getattr(gen, "style", "json")
        texts = gen.complete([conversation(c, s.pairs_per_chunk, style) for c in pending], attempt)
        report["requests"] += len(pending)
        report["retried"] += len(pending) if attempt else 0
        retry = []
        for c, text in zip(pending, texts, strict=True):
            pairs = parse_pairs(text)
            if pairs is None:
                retry.append(c)
                last[c.id] = text
            else:
                parsed[c.id] = pairs[: s.pairs_per_chunk]
        pending = retry
    for c in pending:
        parsed[c.id] = []
        _count(report, "malformed", {"chunk": c.id, "output": last[c.id][:300]})
    return parsed, {c.id: last[c.id] for c in pending}


def _count(report: dict, what: str, example: dict) -> None:
    if what == "kept":
        report["kept"][example["side"]] += 1
    else:
        report["dropped"][what] += 1
    if len(report["examples"][what]) < 3:
        report["examples"][what].append(example)


def _append(path: Path, rows: list[dict]) -> None:
    if rows:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # one write per round


def run_synth(cfg: Config, docs: list[Path], out: Path, generator: Generator | None = None) -> dict:
    """Documents -> filtered QA pairs appended to `out` (train) and `out`.test.jsonl, the dropped ones to
    `out`.rejected.jsonl; returns the report (also when nothing was kept: see `synth`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    s, files = cfg.synth, output_paths(Path(out))
    files["train"].parent.mkdir(parents=True, exist_ok=True)
    gen = generator if generator is not None else make_generator(cfg)
    documents = find_documents([Path(d) for d in docs])
    chunks = chunk_documents(documents, gen.spans, s.chunk_tokens, s.overlap_tokens)
    test_ids = held_out_chunks(chunks, s.test_size, cfg.data.seed)
    kept = {"train": Questions(), "test": Questions()}
    done = {r["chunk"] for r in read_appended(files["done"])}
    kept_before = {}
    for side in kept:
        existing = read_appended(files[side])
        kept_before[side] = len(existing)
        for row in existing:
            kept[side].add(row["question"])
            done.add(row.get("chunk"))
    todo = [c for c in chunks if c.id not in done]
    report = {
        "generator": gen.name,
        "documents": len(documents),
        "chunks": len(chunks),
        "chunks_done_before": len(chunks) - len(todo),
        "chunks_processed": 0,
        "requests": 0,
        "retried": 0,
        "pairs_generated": 0,
        "kept": {"train": 0, "test": 0},
        "kept_before": kept_before,
        "dropped": dict.fromkeys(FILTERS, 0),
        "examples": {k: [] for k in ("kept", *FILTERS)},
    }
    # one round = one local batch or `concurrency` requests
    size = max(cfg.generate.batch_size, s.concurrency)
    columns = (
        TextColumn("synth"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("synth", total=len(todo))
        for i in range(0, len(todo), size):
            batch = todo[i : i + size]
            rows = _round(gen, batch, s, report, kept, test_ids)
            for name in ("train", "test", "rejected"):
                _append(files[name], rows[name])
            # after the pairs: a kill in between redoes the chunk
            _append(files["done"], [{"chunk": c.id} for c in batch])
            report["chunks_processed"] += len(batch)
            bar.advance(task, len(batch))
    # only files that exist: a side that kept nothing has no file, and no path is shown for it
    report["files"] = {k: str(v) for k, v in files.items() if k == "report" or v.exists()}
    files["report"].write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _round(
    gen: Generator,
    batch: list[Chunk],
    s: SynthConfig,
    report: dict,
    kept: dict[str, Questions],
    test_ids: set[str],
) -> dict[str, list[dict]]:
    """One round of chunks -> the rows to append: {train, test, rejected}."""
    parsed, malformed = ask(gen, batch, s, report)
    rows: dict[str, list[dict]] = {"train": [], "test": [], "rejected": []}
    for c in batch:
        side = "test" if c.id in test_ids else "train"
        where = {"side": side, "source": c.source, "chunk": c.id, "generator": gen.name}
        if c.id in malformed:
            rows["rejected"].append({"reason": "malformed", "output": malformed[c.id], **where})
        for pair in parsed[c.id]:
            report["pairs_generated"] += 1
            v = verdict(pair, c, s, kept[side], kept["test" if side == "train" else "train"])
            _count(report, v, {"chunk": c.id, **pair, "side": side})
            if v == "kept":
                kept[side].add(pair["question"])
                rows[side].append({**pair, "source": c.source, "chunk": c.id, "generator": gen.name})
            else:
                rows["rejected"].append({**pair, "reason": v, **where})
    return rows


def require_kept(report: dict, out: Path) -> None:
    """UserError when neither side holds a kept pair (this run's or an earlier one's): nothing to train on."""
    if sum(report["kept"].values()) + sum(report["kept_before"].values()):
        return
    counts = [
        f"{k} {v}" + (" chunk(s) of unparseable output" if k == "malformed" else "")
        for k, v in report["dropped"].items()
        if v
    ]
    why = f"dropped: {', '.join(counts)}" if counts else "the generator wrote no pairs"
    before = (
        f"; {report['chunks_done_before']} chunks were done by an earlier run: "
        f"delete {report['files']['done']} to ask again"
        if report["chunks_done_before"]
        else ""
    )
    rejected = (
        f"; every dropped pair with its reason: {report['files']['rejected']}"
        if "rejected" in report["files"]
        else ""
    )
    # the place is the run, not `out`: that file was never written, and no path that does not exist is shown
    raise UserError(
        f"synth: 0 of {report['pairs_generated']} generated pairs kept, so no {out.name} was written "
        f"({why}{before}{rejected}; report: {report['files']['report']}; "
        f"use a stronger generator (synth.model) or loosen synth.min_grounding / synth.min_answer_chars)"
    )


def synth(cfg: Config, docs: list[Path], out: Path, generator: Generator | None = None) -> dict:
    """Documents -> filtered QA pairs (`run_synth`); a UserError when no pair at all is kept."""
    report = run_synth(cfg, docs, out, generator)
    require_kept(report, Path(out))
    return report


def synth_cli(cfg: Config, docs: list[Path], out: Path, console, generator: Generator | None = None) -> dict:
    """`tunesmith synth`: run, print the quality report (counts per filter, examples); fail if none kept."""
    from rich.table import Table

    r = run_synth(cfg, docs, out, generator)
    table = Table(
        title=f"synth: {r['documents']} documents, {r['chunks']} chunks "
        f"({r['chunks_done_before']} done before)"
    )
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_column("example")
    rows = [
        ("chunks processed", r["chunks_processed"], None),
        ("requests (retried)", f"{r['requests']} ({r['retried']})", None),
        ("pairs generated", r["pairs_generated"], None),
        ("kept train / test", f"{r['kept']['train']} / {r['kept']['test']}", "kept"),
    ]
    rows += [(f"dropped: {k}", v, k) for k, v in r["dropped"].items()]
    for name, count, key in rows:
        ex = r["examples"].get(key) or [{}]
        text = ex[0].get("output") or (
            f"Q: {ex[0]['question']}  A: {ex[0]['answer']}" if "question" in ex[0] else ""
        )
        table.add_row(name, str(count), text[:120])
    console.print(table)
    require_kept(r, Path(out))
    files = r["files"]
    # a side whose file does not exist (nothing kept, now or before) is named without a path
    sides = [
        f"{r['kept'][k]} {k} pairs" + (f" -> {files[k]}" if k in files else " (none kept: no file)")
        for k in ("train", "test")
    ]
    rejected = f", dropped pairs -> {files['rejected']}" if "rejected" in files else ""
    console.print(
        f"kept {', '.join(sides)}{rejected} (report: {files['report']})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return r
