"""Documents -> grounded QA pairs with an LLM (`tunesmith synth DOCS... --out qa.jsonl`).

read (.md .txt .rst .html, .pdf with the `pdf` extra) -> sections by headings -> token windows with overlap
(those three: data/documents.py) -> prompt for N pairs (after a worked example), as JSON or Q:/A: lines -> parse
(JSON array/object, fenced, truncated, or Q:/A: lines; malformed output is retried with sampling) -> filters:
length, grounding in the chunk, echo (the answer only restates the question), near-duplicate questions, and
leakage (a question near one already kept on the other side) -> append to the output.

Files written next to `--out qa.jsonl` (one chunk's pairs all go to one side, chosen by a hash of the
chunk id with synth.test_size, like data/split.py):
- `qa.jsonl`: train pairs, `qa.test.jsonl`: test pairs; `qa` schema + provenance `source`, `chunk`, `generator`
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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tunesmith.config import Config, GenerateConfig, SynthConfig, UserError
from tunesmith.data.checks import jaccard, shingles
from tunesmith.data.documents import Chunk, chunk_documents, find_documents, word_spans
from tunesmith.data.split import normalize_text, split_hash
from tunesmith.endpoint import ChatClient, EndpointFailed

NEAR_DUPLICATE = 0.8  # Jaccard of word 3-grams above which two questions are "the same question"
_STOPWORDS = ("a an the of to in on at for by with and or but is are was were be been it its this that these those as "
              "from which who what when where how why do does did not no can will would should may might has have had")
_STOP = frozenset(_STOPWORDS.split())

SYSTEM = "You write question-answer pairs that teach a model the content of a document."
PROMPT = """Passage from "{source}" (section: {heading}):
\"\"\"
{text}
\"\"\"

Write {n} question-answer pairs about this passage.
- Each question names its subject; never say "the passage" or "the text".
- Each answer is one or two sentences copied or paraphrased from the passage, adding nothing.
{reply}"""
# How to reply. Strong (remote) models follow JSON; SmolLM2-135M never did in our trials, but writes Q:/A: lines.
REPLY = {"json": "Reply with only a JSON array of {n} objects with the keys question and answer.",
         "lines": "Reply with {n} pairs as Q: and A: lines, nothing else."}
# A one-shot example turn before the real request: without it SmolLM2-135M copied the format's placeholders
# ("Q: [Question: 1]") or looped. A richer example (3 facts about a command) was copied verbatim into 5 of
# 8 replies; this plain one much less. Numbers: configs/docs-to-model.yaml.
EXAMPLE = Chunk("acme/README.md#2", "acme/README.md", "acme > Install",
                "Install acme with `pip install acme`. It needs Python 3.9 or newer. The `acme check FILE` command "
                "validates a file and exits with code 1 when it finds an error.")
EXAMPLE_PAIRS = [{"question": "How do you install acme?", "answer": "Install acme with pip install acme."},
                 {"question": "What does the acme check command do?",
                  "answer": "acme check FILE validates a file and exits with code 1 when it finds an error."},
                 {"question": "Which Python version does acme need?", "answer": "acme needs Python 3.9 or newer."}]

# ---- chunks: train or test side ----


def held_out_chunks(chunks: list[Chunk], test_size: float, seed: int) -> set[str]:
    """Chunks whose pairs go to the test side: hash(id) / 2**64 < test_size (stable as chunks are added,
    like data/split.py); at least one chunk stays on the train side."""
    h = {c.id: split_hash(c.id, seed) for c in chunks}
    test = {i for i, v in h.items() if v < test_size * 2**64}
    if test and len(test) == len(h):
        test.discard(max(h, key=h.get))
    return test


# ---- generators ----


class Generator(Protocol):
    """What synth needs from an LLM: a name, a token count for chunking, and batched chat completion."""

    name: str  # also an optional `style`: "json" (default) or "lines", how the prompt asks for the reply

    def spans(self, text: str) -> list[tuple[int, int]]: ...

    def complete(self, conversations: list[list[dict]], attempt: int) -> list[str]: ...


def retry_config(gen: GenerateConfig, attempt: int) -> GenerateConfig:
    """Attempt 0 uses generate.* as set; a retry samples (temperature >= 0.7, new seed) so it can differ."""
    if attempt == 0:
        return gen
    return gen.model_copy(update={"temperature": max(gen.temperature, 0.7), "seed": gen.seed + attempt})


class LocalGenerator:
    """A local model through tunesmith's own batched `generate` (default: model.name)."""

    def __init__(self, cfg: Config):
        from tunesmith.model.export import load_for_inference
        from tunesmith.runtime import device

        self.model, self.tok, _ = load_for_inference(cfg.model.name, cfg.model, device())
        self.gen, self.name = cfg.generate, cfg.model.name
        self.style = "lines"  # see REPLY: small local models write Q:/A: lines far more reliably than JSON

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [tuple(s) for s in self.tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]]

    def complete(self, conversations: list[list[dict]], attempt: int) -> list[str]:
        from tunesmith.generate import generate

        if getattr(self.tok, "chat_template", None):
            ids = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
        else:  # a base model: plain text with a cue
            ids = [self.tok("\n\n".join(m["content"] for m in c) + "\n\n")["input_ids"] for c in conversations]
        # a run of blank lines is where small models start looping: no pair comes after it
        g = retry_config(self.gen, attempt)
        g = g.model_copy(update={"stop": [*g.stop, "\n\n\n"]})
        return [drop_cut_line(c.text) if c.finish_reason == "length" else c.text for c in generate(self.model, self.tok, ids, g)]


class RemoteGenerator:
    """Any OpenAI-compatible endpoint (endpoint.py's `ChatClient`), `concurrency` requests at a time."""

    def __init__(self, s: SynthConfig, gen: GenerateConfig):
        if not s.model:
            raise UserError("synth.model: name the generator model at synth.base_url (e.g. synth.model=gpt-4o-mini)")
        # HTTP retries (429, 5xx, timeouts) are the client's; synth.max_retries also bounds malformed-output retries
        self.client = ChatClient(s.base_url, s.model, api_key_env=s.api_key_env, timeout_s=120.0,
                                 max_retries=s.max_retries, where="synth")
        self.s, self.gen, self.name = s, gen, s.model

    def spans(self, text: str) -> list[tuple[int, int]]:
        return word_spans(text)

    def _one(self, messages: list[dict], attempt: int) -> str:
        g = retry_config(self.gen, attempt)
        try:
            return self.client.chat(messages, max_tokens=g.max_new_tokens, temperature=g.temperature).text
        except EndpointFailed:
            return ""  # the server kept failing: this attempt counts as malformed output

    def complete(self, conversations: list[list[dict]], attempt: int) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.s.concurrency) as pool:  # the openai client is safe to share between threads
            return list(pool.map(lambda c: self._one(c, attempt), conversations))


def drop_cut_line(text: str) -> str:
    """Q:/A: output cut by max_new_tokens -> without its last, unfinished line (so no half answer is kept).

    >>> drop_cut_line("Q: Who?\\nA: Ada.\\nQ: When?\\nA: In 18")
    'Q: Who?\\nA: Ada.\\nQ: When?'
    """
    return text[: text.rfind("\n")] if "\n" in text else text


def make_generator(cfg: Config) -> Generator:
    """Remote when synth.base_url is set, else the local model.name."""
    return RemoteGenerator(cfg.synth, cfg.generate) if cfg.synth.base_url else LocalGenerator(cfg)


def _user(chunk: Chunk, n: int, style: str) -> str:
    reply = REPLY[style].format(n=n)
    return PROMPT.format(source=chunk.source, heading=chunk.heading or "-", n=n, text=chunk.text, reply=reply)


def _reply(pairs: list[dict], style: str) -> str:
    if style == "json":
        return json.dumps(pairs, ensure_ascii=False)
    return "\n".join(f"Q: {p['question']}\nA: {p['answer']}" for p in pairs)


def conversation(chunk: Chunk, n: int, style: str = "json") -> list[dict]:
    """Chat messages asking for `n` grounded pairs about `chunk` (reply style: json or Q:/A: lines), after a
    worked example (EXAMPLE, answered in the same style) so that small models see the format filled in."""
    k = min(n, len(EXAMPLE_PAIRS))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": _user(EXAMPLE, k, style)},
            {"role": "assistant", "content": _reply(EXAMPLE_PAIRS[:k], style)},
            {"role": "user", "content": _user(chunk, n, style)}]


# ---- parsing ----

_QA_LINE = re.compile(r"^\s*(?:[-*]\s*|\d+[.)]\s*)?\**(Q|Question|A|Answer)\**\s*\d*\s*[:：]\**\s*(.*)$", re.IGNORECASE)


def _pair(obj: object) -> dict | None:
    if not isinstance(obj, dict):
        return None
    low = {str(k).lower(): v for k, v in obj.items()}
    q, a = low.get("question", low.get("q")), low.get("answer", low.get("a"))
    return {"question": q.strip(), "answer": a.strip()} if isinstance(q, str) and isinstance(a, str) else None


def _from_json(obj: object) -> list[dict]:
    if isinstance(obj, dict):
        inner = next((v for v in obj.values() if isinstance(v, list)), None)
        return _from_json(inner) if inner is not None else [p for p in [_pair(obj)] if p]
    return [p for p in map(_pair, obj) if p] if isinstance(obj, list) else []


def parse_pairs(text: str) -> list[dict] | None:
    """Generator output -> [{question, answer}], or None when nothing usable is in it (malformed).

    Accepted: a JSON array of objects, an object holding such an array or one pair, either inside a code
    fence or surrounded by prose; a truncated array (complete objects are salvaged); `Q:`/`A:` lines.
    >>> parse_pairs('Sure! ```json\\n[{"question": "Who?", "answer": "Ada."}]\\n```')
    [{'question': 'Who?', 'answer': 'Ada.'}]
    """
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    for a, b in ("[]", "{}"):
        i, j = text.find(a), text.rfind(b)
        if 0 <= i < j:
            candidates.append(text[i : j + 1])
    for c in candidates:
        try:
            pairs = _from_json(json.loads(c))
        except json.JSONDecodeError:
            continue
        if pairs:
            return pairs
    salvaged = []
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            salvaged += [p for p in [_pair(json.loads(m.group(0)))] if p]
        except json.JSONDecodeError:
            continue
    return salvaged or _from_qa_lines(text) or None


def _from_qa_lines(text: str) -> list[dict]:
    pairs, q, a, into = [], None, None, None
    for line in text.splitlines() + ["Q:"]:
        m = _QA_LINE.match(line)
        if m and m.group(1).lower().startswith("q"):
            if q and a:
                pairs.append({"question": q.strip(), "answer": a.strip()})
            q, a, into = m.group(2), None, "q"
        elif m:
            a, into = m.group(2), "a"
        elif re.fullmatch(r"\s*(Q|A|Question|Answer)\s*\d*\s*", line, re.IGNORECASE):
            continue  # a marker without its colon (output cut short): not part of the answer
        elif into == "a" and line.strip():
            a += " " + line.strip()  # an answer may run over several lines
        elif into == "q" and line.strip():
            q += " " + line.strip()
    return pairs


# ---- filters ----


def content_words(text: str) -> list[str]:
    """Normalized words minus stopwords: what an answer must share with its chunk.

    >>> content_words("The CLI exits with code 2.")
    ['cli', 'exits', 'code', '2']
    """
    return [w for w in normalize_text(text).split() if w not in _STOP]


def grounding(answer: str, chunk_text: str) -> float:
    """Share of the answer's content words found in the chunk (0 when the answer has none)."""
    words = content_words(answer)
    have = set(normalize_text(chunk_text).split())
    return sum(w in have for w in words) / len(words) if words else 0.0


@dataclass
class Questions:
    """Kept questions of one side: exact (normalized) lookup plus word 3-gram sets for near duplicates."""

    exact: set[str] = field(default_factory=set)
    grams: list[set[int]] = field(default_factory=list)
    index: dict[int, list[int]] = field(default_factory=dict)  # shingle -> kept questions holding it

    def near(self, q: str) -> bool:
        if normalize_text(q) in self.exact:
            return True
        g = shingles(q)
        seen = {i for h in g for i in self.index.get(h, ())}
        return any(jaccard(g, self.grams[i]) >= NEAR_DUPLICATE for i in seen)

    def add(self, q: str) -> None:
        self.exact.add(normalize_text(q))
        g = shingles(q)
        for h in g:
            self.index.setdefault(h, []).append(len(self.grams))
        self.grams.append(g)


def verdict(pair: dict, chunk: Chunk, s: SynthConfig, mine: Questions, other: Questions) -> str:
    """'kept' or the filter that drops the pair: length (answer chars; question content words), grounding, echo, duplicate (same side) or leakage (other side)."""
    q, a = pair["question"], pair["answer"]
    if not (s.min_answer_chars <= len(a) <= s.max_answer_chars) or len(content_words(q)) < 2:
        return "length"  # a question needs two content words to name its subject ("[1]" and "Why?" do not)
    if grounding(a, chunk.heading + "\n" + chunk.text) < s.min_grounding:
        return "grounding"
    if set(content_words(a)) <= set(content_words(q)):
        return "echo"  # the answer only restates its question ("How do you run X?" "Run X."): nothing to learn
    if mine.near(q):
        return "duplicate"
    if other.near(q):
        return "leakage"
    return "kept"


# ---- the run ----

FILTERS = ("malformed", "length", "grounding", "echo", "duplicate", "leakage")


def output_paths(out: Path) -> dict[str, Path]:
    """qa.jsonl -> {train: qa.jsonl, test: qa.test.jsonl, rejected: qa.rejected.jsonl, done: qa.done.jsonl,
    report: qa.report.json}."""
    return {"train": out, "test": out.with_suffix(".test.jsonl"), "rejected": out.with_suffix(".rejected.jsonl"),
            "done": out.with_suffix(".done.jsonl"), "report": out.with_suffix(".report.json")}


def read_appended(path: Path) -> list[dict]:
    """Rows of an append-only jsonl; a last line cut short by a kill is removed from the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def ask(gen: Generator, chunks: list[Chunk], s: SynthConfig, report: dict) -> tuple[dict[str, list[dict]], dict[str, str]]:
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
    report = {"generator": gen.name, "documents": len(documents), "chunks": len(chunks), "chunks_done_before": len(chunks) - len(todo),
              "chunks_processed": 0, "requests": 0, "retried": 0, "pairs_generated": 0, "kept": {"train": 0, "test": 0},
              "kept_before": kept_before, "dropped": dict.fromkeys(FILTERS, 0), "examples": {k: [] for k in ("kept", *FILTERS)}}
    size = max(cfg.generate.batch_size, s.concurrency)  # one round = one local batch or `concurrency` requests
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("synth", total=len(todo))
        for i in range(0, len(todo), size):
            batch = todo[i : i + size]
            rows = _round(gen, batch, s, report, kept, test_ids)
            for name in ("train", "test", "rejected"):
                _append(files[name], rows[name])
            _append(files["done"], [{"chunk": c.id} for c in batch])  # after the pairs: a kill in between redoes the chunk
            report["chunks_processed"] += len(batch)
            bar.advance(task, len(batch))
    # only files that exist: a side that kept nothing has no file, and no path is shown for it
    report["files"] = {k: str(v) for k, v in files.items() if k == "report" or v.exists()}
    files["report"].write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _round(gen: Generator, batch: list[Chunk], s: SynthConfig, report: dict, kept: dict[str, Questions],
           test_ids: set[str]) -> dict[str, list[dict]]:
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
    counts = [f"{k} {v}" + (" chunk(s) of unparseable output" if k == "malformed" else "") for k, v in report["dropped"].items() if v]
    why = f"dropped: {', '.join(counts)}" if counts else "the generator wrote no pairs"
    before = (f"; {report['chunks_done_before']} chunks were done by an earlier run: delete {report['files']['done']} to ask "
              f"again" if report["chunks_done_before"] else "")
    rejected = f"; every dropped pair with its reason: {report['files']['rejected']}" if "rejected" in report["files"] else ""
    # the place is the run, not `out`: that file was never written, and no path that does not exist is shown
    raise UserError(f"synth: 0 of {report['pairs_generated']} generated pairs kept, so no {out.name} was written "
                    f"({why}{before}{rejected}; report: {report['files']['report']}; "
                    f"use a stronger generator (synth.model) or loosen synth.min_grounding / synth.min_answer_chars)")


def synth(cfg: Config, docs: list[Path], out: Path, generator: Generator | None = None) -> dict:
    """Documents -> filtered QA pairs (`run_synth`); a UserError when no pair at all is kept."""
    report = run_synth(cfg, docs, out, generator)
    require_kept(report, Path(out))
    return report


def synth_cli(cfg: Config, docs: list[Path], out: Path, console, generator: Generator | None = None) -> dict:
    """`tunesmith synth`: run, print the quality report (counts per filter and examples), then fail if nothing was kept."""
    from rich.table import Table

    r = run_synth(cfg, docs, out, generator)
    table = Table(title=f"synth: {r['documents']} documents, {r['chunks']} chunks ({r['chunks_done_before']} done before)")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_column("example")
    rows = [("chunks processed", r["chunks_processed"], None), ("requests (retried)", f"{r['requests']} ({r['retried']})", None),
            ("pairs generated", r["pairs_generated"], None), ("kept train / test", f"{r['kept']['train']} / {r['kept']['test']}", "kept")]
    rows += [(f"dropped: {k}", v, k) for k, v in r["dropped"].items()]
    for name, count, key in rows:
        ex = r["examples"].get(key) or [{}]
        text = ex[0].get("output") or (f"Q: {ex[0]['question']}  A: {ex[0]['answer']}" if "question" in ex[0] else "")
        table.add_row(name, str(count), text[:120])
    console.print(table)
    require_kept(r, Path(out))
    files = r["files"]
    # a side whose file does not exist (nothing kept, now or before) is named without a path
    sides = [f"{r['kept'][k]} {k} pairs" + (f" -> {files[k]}" if k in files else " (none kept: no file)") for k in ("train", "test")]
    rejected = f", dropped pairs -> {files['rejected']}" if "rejected" in files else ""
    console.print(f"kept {', '.join(sides)}{rejected} (report: {files['report']})", markup=False, highlight=False, soft_wrap=True)
    return r
