"""`tunesmith data inspect`: what the model will see, before any compute is spent.

Counts per split, token-length histogram (terminal + `<out_dir>/data_lengths.png`), share truncated at
max_length and a suggested max_length (p99 rounded up to 32), the examples cut at max_length and the part
they lost (user content, the template's fixed text, the response; a warning above WARN_CUT_SHARE with the
max_length that would keep them whole), duplicates, near duplicates, train/test leakage, rows skipped, and
two rendered examples with the loss-carrying tokens highlighted.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tunesmith.config import Config
from tunesmith.data.checks import exact_duplicates, histogram, leakage, length_stats, near_duplicates
from tunesmith.data.formats import get_template
from tunesmith.data.pipeline import load_examples, render_all
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, render
from tunesmith.data.truncate import CONTENT, PROMPT, RESPONSE, WARN_CUT_SHARE, Cut

PNG_NAME = "data_lengths.png"
_NO_LIMIT = 1 << 30  # render without truncation to measure the true lengths


def inspect_data(cfg: Config, tokenizer, out_dir: str | Path | None = None) -> dict:
    """The inspect report as a JSON-ready dict; writes data_lengths.png (and data_rejects.jsonl) to out_dir"""
    d = cfg.data
    template = get_template(d.template, d.format)
    rejects = Rejects(d.on_bad_row, out_dir)
    train_ex, test_ex = load_examples(d, rejects)
    # Full lengths first (a throwaway Rejects: only the real render below decides which rows are bad).
    full = {
        name: render_all(ex, template, tokenizer, _NO_LIMIT, d.truncation, Rejects("skip"))
        for name, ex in (("train", train_ex), ("test", test_ex))
    }
    cuts: list[Cut] = []
    train, test = (
        render(ex, template, tokenizer, d.max_length, d.truncation, rejects, cuts) if ex else []
        for ex in (train_ex, test_ex)
    )
    rejects_path = rejects.write()
    lengths = {k: [len(s["input_ids"]) for s in v] for k, v in full.items()}
    stats = {k: length_stats(lengths[k], d.max_length, [s["where"] for s in full[k]]) for k in full}
    all_lengths = lengths["train"] + lengths["test"]
    overall = length_stats(all_lengths, d.max_length)
    report = {
        "path": d.path,
        "format": d.format,
        "max_length": d.max_length,
        "counts": {
            "train": len(train_ex),
            "test": len(test_ex),
            "train_samples": len(train),
            "test_samples": len(test),
            "train_tokens": sum(len(s["input_ids"]) for s in train),
            "test_tokens": sum(len(s["input_ids"]) for s in test),
        },
        "lengths": {k: asdict(v) for k, v in stats.items()},
        "histogram": histogram(all_lengths),
        "share_truncated": overall.share_truncated,
        "suggested_max_length": overall.suggested_max_length,
        "cut": cut_summary(cuts, len(train_ex) + len(test_ex), all_lengths, d.max_length),
        "duplicates": [asdict(x) for x in exact_duplicates(train_ex + test_ex)],
        "near_duplicates": [asdict(x) for x in near_duplicates(train_ex + test_ex)],
        "leakage": [asdict(x) for x in leakage(train_ex, test_ex)],
        "rejected": rejects.count,
        "rejects_file": str(rejects_path) if rejects_path and rejects.count else None,
        "examples": train[:2],
        "png": None,
    }
    if out_dir is not None and all_lengths:
        report["png"] = str(plot_lengths(lengths, d.max_length, overall.p99, Path(out_dir) / PNG_NAME))
    return report


def cut_summary(cuts: list[Cut], n_examples: int, lengths: list[int], max_length: int) -> dict:
    """Examples cut at max_length per part they lost, the first few, and a warning above WARN_CUT_SHARE.

    The warning says how far max_length would have to grow (the untruncated lengths' p95 and max)."""
    parts = {part: sum(c.part == part for c in cuts) for part in (CONTENT, PROMPT, RESPONSE)}
    share = len(cuts) / n_examples if n_examples else 0.0
    p95 = int(math.ceil(np.percentile(lengths, 95))) if lengths else 0
    longest = max(lengths, default=0)
    warning = None
    if share > WARN_CUT_SHARE:
        lost = ", ".join(f"{part}: {n}" for part, n in parts.items() if n)
        grow = f"to {p95} (+{p95 - max_length}) to keep 95% whole, " if max_length < p95 < longest else ""
        warning = (
            f"{len(cuts)} of {n_examples} examples ({share:.1%}) are cut at data.max_length={max_length} "
            f"(cut in {lost}); data.max_length would have to grow {grow}to {longest} "
            f"(+{longest - max_length}) to keep all whole"
        )
    return {
        "examples": len(cuts),
        "share": round(share, 4),
        "parts": parts,
        "p95": p95,
        "max": longest,
        "first": [asdict(c) for c in cuts[:5]],
        "warning": warning,
    }


def plot_lengths(lengths: dict[str, list[int]], max_length: int, p99: int, path: Path) -> Path:
    """Histogram of token lengths per split with max_length and p99 marked, saved as PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    import numpy as np

    everything = [n for v in lengths.values() for n in v]
    # shared by both splits
    bins = np.histogram_bin_edges(everything, bins=min(40, max(1, len(set(everything)))))
    names = [name for name, v in lengths.items() if v]
    ax.hist(
        [lengths[n] for n in names],
        bins=bins,
        stacked=True,
        label=[f"{n} ({len(lengths[n])})" for n in names],
    )
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.axvline(p99, color="black", linestyle=":", label=f"p99 {p99}")
    ax.set_xlabel("tokens per example (before truncation)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def highlight(sample: dict, tokenizer):
    """A Rich Text of one sample: loss-carrying tokens on green, prompt tokens dim."""
    from rich.text import Text

    text = Text()
    ids, labels = sample["input_ids"], sample["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        # decode runs of same-kind tokens together so multi-byte characters split across tokens survive
        if i == len(ids) or (labels[i] == IGNORE) != (labels[start] == IGNORE):
            piece = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            text.append(piece, style="dim" if labels[start] == IGNORE else "black on green")
            start = i
    return text


def print_inspect(report: dict, tokenizer, console, examples: list[dict] | None = None) -> None:
    """Print the report with Rich: counts and lengths, histogram, findings, and the highlighted examples."""
    examples = report["examples"] if examples is None else examples
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    c = report["counts"]
    console.print(
        f"[bold]{report['path']}[/bold]  format={report['format']}  max_length={report['max_length']}"
    )
    t = Table(title="splits (token lengths before truncation)")
    for col in ("split", "examples", "samples", "tokens", "mean", "p50", "p90", "p99", "max", "truncated"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for name in ("train", "test"):
        s = report["lengths"][name]
        t.add_row(
            name,
            str(c[name]),
            str(c[f"{name}_samples"]),
            str(c[f"{name}_tokens"]),
            str(s["mean"]),
            str(s["p50"]),
            str(s["p90"]),
            str(s["p99"]),
            str(s["max"]),
            f"{s['share_truncated']:.1%}",
        )
    console.print(t)
    console.print(terminal_histogram(report["histogram"]))
    cut = report["cut"]
    parts = ", ".join(f"{part} {n}" for part, n in cut["parts"].items())
    console.print(
        f"cut at max_length={report['max_length']}: {cut['examples']} examples "
        f"({cut['share']:.1%}; lost tokens in {parts})"
    )
    if cut["warning"]:
        console.print(f"[bold yellow]warning:[/] {escape(cut['warning'])}")
    console.print(
        f"suggested max_length: [bold]{report['suggested_max_length']}[/bold] (p99 rounded up to 32)"
    )
    f = Table(title="checks")
    f.add_column("check")
    f.add_column("found", justify="right")
    f.add_column("first cases (row ← earlier row)", overflow="fold")  # paths wrap instead of being cut
    for label, key in (
        ("exact duplicates", "duplicates"),
        ("near duplicates", "near_duplicates"),
        ("train/test leakage", "leakage"),
    ):
        items = report[key]
        cases = "\n".join(f"{x['where']} ← {x['of']} ({x['similarity']:.2f})" for x in items[:3])
        f.add_row(label, str(len(items)), cases + ("\n…" if len(items) > 3 else ""))
    outliers = report["lengths"]["train"]["outliers"]
    f.add_row(
        "length outliers in train (> p99 or max_length)",
        str(report["lengths"]["train"]["n_outliers"]),
        "\n".join(f"{w}: {n} tokens" for w, n in outliers[:3]),
    )
    f.add_row(
        "cut at max_length (part that lost tokens)",
        str(cut["examples"]),
        "\n".join(f"{c['where']}: {c['part']}, {c['length']} tokens" for c in cut["first"][:3]),
    )
    skipped = f"see {report['rejects_file']}" if report["rejects_file"] else ""
    f.add_row("rows skipped", str(report["rejected"]), skipped)
    console.print(f)
    for sample in examples[:2]:
        title = f"{sample['where']}  ([black on green]learned[/]  [dim]prompt, no loss[/])"
        console.print(Panel(highlight(sample, tokenizer), title=title, title_align="left"))
    if report.get("png"):
        console.print(f"length histogram: {report['png']}")


def terminal_histogram(bins: list, width: int = 40) -> str:
    """Rows of `low-high │████ count` (tokens per example), bar length proportional to the bin's count."""
    if not bins:
        return "(no examples)"
    top = max(n for _, _, n in bins) or 1
    pad = len(str(bins[-1][1] - 1))
    # bins hold low <= length < high: label them with inclusive ends
    return "\n".join(
        f"{lo:>{pad}}-{hi - 1:<{pad}} │{'█' * round(width * n / top):<{width}} {n}" for lo, hi, n in bins
    )
