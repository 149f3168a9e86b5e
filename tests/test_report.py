"""report.html is written, parses, is self-contained, and ranks improvements/regressions correctly."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

from rich.console import Console

from tunesmith.eval.report import write_report
from tunesmith.eval.summary import direction, print_summary, summary_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Collector(HTMLParser):
    """Tags with their attributes, checked for balance on the way (void elements excepted)."""

    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def example(
    i: int, base_score: float, tuned_score: float, base_answer: str = "b", tuned_answer: str = "t"
) -> dict:
    return {
        "prompt": f"Q{i}?",
        "question": f"question {i}",
        "reference": "ref words here",
        "base": {
            "answer": base_answer,
            "metrics": {"rouge_l": base_score},
            "buckets": ["too_long"] if i % 2 else [],
        },
        "tuned": {"answer": tuned_answer, "metrics": {"rouge_l": tuned_score}, "buckets": []},
    }


METRICS = {
    "base": {"rouge_l": 0.2, "loss": 2.0, "answer_words": 30, "n": 4},
    "tuned": {"rouge_l": 0.5, "loss": 2.5, "answer_words": 12, "n": 4},
    "delta": {"rouge_l": 0.3, "loss": 0.5, "answer_words": -18, "n": 0},
    "notes": ["embedding similarity skipped: eval.embedding_model is null"],
}


def terminal_table(metrics: dict) -> tuple[dict[str, list[str]], str]:
    """print_summary's table as {metric: [cells after the name]}, and the whole text."""
    out = io.StringIO()
    print_summary(metrics, Console(file=out, width=100, color_system=None))
    text = out.getvalue()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    return {c[0]: c[1:] for c in cells}, text


def parse(path) -> Collector:
    c = Collector()
    c.feed(path.read_text(encoding="utf-8"))
    c.close()
    assert c.stack == []
    return c


def test_summary_rows_know_which_way_is_better():
    rows = {r["metric"]: r for r in summary_rows(METRICS)}
    assert rows["rouge_l"]["verdict"] == "better"
    assert rows["loss"]["verdict"] == "worse"  # lower is better and it rose
    assert rows["answer_words"]["verdict"] == ""  # descriptive
    assert direction("buckets.empty") == -1 and direction("perplexity") == -1 and direction("token_f1") == 1
    table, text = terminal_table(METRICS)
    assert table["ROUGE-L ↑"] == ["0.2", "0.5", "+0.3 ▲ better"]
    assert table["answer loss ↓"] == ["2", "2.5", "+0.5 ▲ worse"]
    assert table["answer words"] == ["30", "12", "-18 ▼"]  # descriptive: no arrow, no verdict
    assert "note: embedding similarity skipped" in text


def test_write_report_is_self_contained(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "split": "train", "loss": 3.0 - 0.1 * s, "lr": 1e-4} for s in range(1, 11)]
    lines += [{"step": 5, "split": "eval", "loss": 2.7}, {"step": 10, "split": "eval", "loss": 2.4}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 11, "spl')  # torn last line
    rows = [
        example(0, 0.1, 0.9, base_answer="<script>alert(1)</script> & co"),
        example(1, 0.5, 0.6),
        example(2, 0.7, 0.2, tuned_answer="worse <b>answer</b>"),
        example(3, 0.4, 0.4),
    ]
    path = write_report(tmp_path / "eval", METRICS, rows, log, title="base vs tuned <run>")

    assert path == tmp_path / "eval" / "report.html"
    for name in ("metrics.png", "loss.png", "lengths.png", "buckets.png"):
        assert (tmp_path / "eval" / name).read_bytes().startswith(PNG_MAGIC)
    page = parse(path)
    html_text = path.read_text()
    assert "http://" not in html_text and "https://" not in html_text
    assert not [t for t, a in page.tags if t in ("script", "link", "iframe")]
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) == 4
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    text = "".join(page.text)
    assert "<script>alert(1)</script> & co" in text  # escaped in the file, so it came back as text
    assert "<b>answer</b>" in text and "base vs tuned <run>" in text
    # ranking: improvements are example 0 (+0.8) then 1 (+0.1); the only regression is example 2
    improvements = html_text.index("Largest improvements")
    regressions = html_text.index("Largest regressions")
    assert improvements < html_text.index("question 0") < html_text.index("question 1") < regressions
    assert html_text.index("question 2", regressions) > regressions
    assert "question 3" not in html_text  # no change: in neither table


def test_report_for_a_single_model_has_no_deltas(tmp_path, capsys):
    metrics = {"tuned": {"rouge_l": 0.5, "exact_match": 0.25}, "notes": []}
    rows = [
        {k: v for k, v in example(i, 0.0, s).items() if k != "base"} for i, s in enumerate([0.9, 0.1, 0.5])
    ]
    path = write_report(tmp_path, metrics, rows, None, title="eval")
    html_text = path.read_text()
    parse(path)
    assert "delta" not in html_text and "Lowest rouge_l" in html_text
    assert html_text.index("question 1") < html_text.index("question 2") < html_text.index("question 0")
    assert "no data" in html_text  # no metrics.jsonl: loss plot replaced by a note
    assert not (tmp_path / "loss.png").exists()
    # one column, no delta
    assert terminal_table(metrics)[0] == {"ROUGE-L ↑": ["0.5"], "exact match ↑": ["0.25"]}
    console = Console(width=100, force_terminal=False, color_system=None)
    print_summary(METRICS, console)
    out = capsys.readouterr().out
    assert "ROUGE-L ↑" in out and "+0.3 ▲ better" in out and "note: embedding similarity skipped" in out


def test_many_systems_one_table_best_marked_and_grouped_charts(tmp_path):
    metrics = {
        "systems": ["base", "base+rag", "tuned"],
        "base": {"token_f1": 0.2, "loss": 2.0, "prompt_tokens": 50.0, "buckets": {"empty": 1}},
        "base+rag": {"token_f1": 0.6, "prompt_tokens": 300.0, "buckets": {"empty": 0}},
        "tuned": {"token_f1": 0.4, "loss": 1.5, "prompt_tokens": 50.0, "buckets": {"empty": 0}},
        "verdict": "On held-out questions base+rag answers best.",
        "pairwise": {"metric": "rouge_l", "pairs": {"tuned vs base": {"wins": 3, "losses": 1, "ties": 0}}},
        "notes": [],
    }
    rows = {r["metric"]: r for r in summary_rows(metrics)}
    assert rows["token_f1"]["best"] == {"base+rag"} and rows["loss"]["best"] == {"tuned"}
    assert rows["prompt_tokens"]["best"] == {"base", "tuned"}  # a tie: both cheapest
    assert "delta" not in rows["token_f1"]  # three systems: no single delta column
    compact = [r["metric"] for r in summary_rows(metrics, compact=True)]
    assert compact == ["token_f1", "loss", "prompt_tokens"]  # bucket counts are detail, below
    path = write_report(tmp_path, metrics, [], None, title="three")
    text = path.read_text()
    assert text.index("base+rag answers best") < text.index("<h2>Summary</h2>") < text.index("Every metric")
    assert '<td class="num best">0.6</td>' in text and "3 / 1 / 0" in text
    parse(path)
    table, out = terminal_table(metrics)
    assert out.startswith("On held-out questions base+rag answers best.")
    assert table["token F1 ↑"] == ["0.2", "0.6", "0.4"] and table["prompt tokens / answer ↓"][1] == "300"
