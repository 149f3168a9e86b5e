"""compare's answering under eval.time_budget: every system answers the same questions, a chunk at a time.

The held-out questions and the probe are cut into chunks of eval.batch_size (one generation batch each),
held-out first within a chunk and both sets spread over the chunks in proportion, so the first chunk
already asks some of each. Chunk 1 goes to every system, then chunk 2, ...: whenever the budget stops
answering, every system has answered the same questions. Before each chunk after the first, its cost is
predicted from the chunks done (each system's seconds per question, its answer-token loss pass included)
and answering stops when that chunk plus what comes after answering (scoring, embeddings, the report;
tail_estimator measures them once on the first chunk's answers) would end past the budget. The first chunk
is always answered: a comparison of nothing says nothing.

Models stay loaded across chunks: a PEFT adapter is one model (base answers with the adapter switched off,
as without a budget); a fully fine-tuned model is held beside the base model, twice the memory of the
unbudgeted path, which loads them one after the other, because reloading both for every chunk would spend
the budget on loading.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import Config
from tunesmith.eval.questions import Questions, subset
from tunesmith.eval.report import write_report
from tunesmith.eval.scoring import summarize
from tunesmith.eval.systems import LOCAL_MODELS, Addons, Answers, System, answer_endpoint, answer_local
from tunesmith.eval.verdict import pairwise
from tunesmith.model.export import ADAPTER_CONFIG
from tunesmith.model.load import load_model
from tunesmith.runtime import print0


@dataclass(frozen=True)
class Chunk:
    """The held-out and probe questions (indices into each set) of one chunk."""

    test: range
    probe: range

    @property
    def size(self) -> int:
        """Questions in the chunk."""
        return len(self.test) + len(self.probe)


def plan_chunks(n_test: int, n_probe: int, size: int) -> list[Chunk]:
    """Chunks of `size` questions over both sets: after chunk i, the held-out share of the questions asked
    is rounded up (held-out first), and at least i probe questions are in while there are any.

    >>> [(len(c.test), len(c.probe)) for c in plan_chunks(16, 12, 16)]
    [(10, 6), (6, 6)]
    """
    total = n_test + n_probe
    out: list[Chunk] = []
    test_at, probe_at = 0, 0
    for i in range(math.ceil(total / size) if total else 0):
        asked = min(total, (i + 1) * size)
        probe_to = max(asked - math.ceil(asked * n_test / total), min(n_probe, i + 1))
        test_to = asked - probe_to
        out.append(Chunk(range(test_at, test_to), range(probe_at, probe_to)))
        test_at, probe_at = test_to, probe_to
    return out


@dataclass
class Budgeted:
    """What the budget let through: chunks answered of those planned, and why answering stopped."""

    budget_s: float
    planned: list[Chunk]
    done: int = 0  # chunks answered by every system
    seconds: float = 0.0  # elapsed at the end of answering (from the start of compare)
    next_s: float | None = None  # the refused chunk's predicted seconds (None: every chunk answered)
    tail_s: float | None = None  # predicted seconds after answering, when answering stopped
    per_question_s: dict[str, float] = field(default_factory=dict)

    def counts(self) -> tuple[int, int, int, int]:
        """(held-out answered, held-out planned, probe answered, probe planned)."""
        asked = self.planned[: self.done]
        return (
            sum(len(c.test) for c in asked),
            sum(len(c.test) for c in self.planned),
            sum(len(c.probe) for c in asked),
            sum(len(c.probe) for c in self.planned),
        )

    def to_dict(self) -> dict:
        """metrics.json's "answered" section, with the one line the table and the report show."""
        n, m, p, q = self.counts()
        text = (
            f"answered {n} of {m} held-out and {p} of {q} probe questions in the budget ({self.budget_s:g}s)"
        )
        if self.next_s is not None:
            text += (
                f": chunk {self.done + 1} of {len(self.planned)} was predicted to take {self.next_s:.0f} s "
                f"more, {self.tail_s or 0:.0f} s kept for scoring and the report, at {self.seconds:.0f} s"
            )
        return {
            "test": n,
            "test_of": m,
            "probe": p,
            "probe_of": q,
            "budget_s": self.budget_s,
            "chunks": self.done,
            "chunks_of": len(self.planned),
            "answering_ended_s": self.seconds,
            "next_chunk_s": self.next_s,
            "tail_s": self.tail_s,
            "seconds_per_question": self.per_question_s,
            "text": text,
        }


def run_chunks(
    plan: list[Chunk],
    names: list[str],
    answer: Callable[[str, Chunk], Answers],
    elapsed: Callable[[], float],
    budget_s: float,
    tail_s: Callable[[dict[str, list[Answers]], int], float],
) -> tuple[dict[str, list[Answers]], Budgeted]:
    """Each chunk answered by every system in turn, until the next one would end past the budget.

    `elapsed`: seconds since compare started (the budget's clock); `tail_s(answers so far, questions)`: the
    predicted seconds after answering when that many questions are answered."""
    got: dict[str, list[Answers]] = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)
    asked = 0
    rec = Budgeted(budget_s, plan)
    for i, chunk in enumerate(plan):
        if i > 0:  # predicted from the chunks done: each system's seconds per question, this chunk's size
            need = sum(spent[n] / asked * chunk.size for n in names)
            tail = tail_s(got, asked + chunk.size)
            if elapsed() + need + tail > budget_s:
                rec.next_s, rec.tail_s = need, tail
                break
        for n in names:
            t = elapsed()
            got[n].append(answer(n, chunk))
            spent[n] += elapsed() - t
        asked += chunk.size
        rec.done = i + 1
    rec.seconds = elapsed()
    rec.per_question_s = {n: spent[n] / asked for n in names} if asked else {}
    return got, rec


def merged(parts: list[Answers]) -> Answers:
    """One system's chunks as one Answers over the questions answered (held-out, then probe, in order)."""
    n_test = [len(a.test) for a in parts]
    split = [(a.latencies, a.prompt_tokens, a.completion_tokens) for a in parts]
    lists = []
    for k in range(3):  # each per-answer list: every chunk's held-out part, then every chunk's probe part
        lists.append(
            [x for (ls, n) in zip(split, n_test) for x in ls[k][:n]]
            + [x for (ls, n) in zip(split, n_test) for x in ls[k][n:]]
        )
    losses = [a.loss for a in parts if a.loss]
    loss: dict = {}
    if losses:  # token-weighted: the mean over every answer token of the answered held-out questions
        tokens = sum(x["tokens"] for x in losses)
        mean = sum(x["loss"] * x["tokens"] for x in losses) / max(tokens, 1)
        loss = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens}
    peaks = [a.peak_memory_bytes for a in parts if a.peak_memory_bytes is not None]
    return Answers(
        [c for a in parts for c in a.test],
        [c for a in parts for c in a.probe],
        loss,
        sum(a.seconds for a in parts),
        latencies=lists[0],
        prompt_tokens=lists[1],
        completion_tokens=lists[2],
        peak_memory_bytes=max(peaks) if peaks else None,  # the largest chunk's peak above its own start
        dropped_shots=sum(a.dropped_shots for a in parts),
    )


def load_local(
    cfg: Config, final: Path | None, dev: torch.device, wanted: tuple[str, ...]
) -> tuple[dict, bool]:
    """({"base": model, "tuned": model} for the wanted ones, all loaded at once; whether it is one adapter
    model whose base is the adapter switched off)."""
    if is_adapter(final, wanted):
        model = load_adapter(cfg, final, dev)
        print0(f"base: {cfg.model.name}, adapter off; tuned: {final}, adapter on")
        return dict.fromkeys(wanted, model), True
    return {which: load_full(cfg, final, which, dev) for which in wanted}, False


def is_adapter(final: Path | None, wanted: tuple[str, ...]) -> bool:
    """The tuned model is asked for and is a PEFT adapter (one load serves base and tuned)."""
    return final is not None and "tuned" in wanted and (final / ADAPTER_CONFIG).is_file()


def load_adapter(cfg: Config, final: Path, dev: torch.device) -> torch.nn.Module:
    """The base (quantized as in training) with the run's adapter on, in eval mode."""
    from peft import PeftModel

    quantize = cfg.lora.quantize if cfg.lora else None
    return PeftModel.from_pretrained(load_model(cfg.model, dev, quantize=quantize), str(final)).eval()


def load_full(cfg: Config, final: Path | None, which: str, dev: torch.device) -> torch.nn.Module:
    """The base model or the run's full fine-tune, in eval mode (its name printed)."""
    name = cfg.model.name if which == "base" else str(final)
    print0(f"{which}: {name}")
    return load_model(cfg.model.model_copy(update={"name": name}), dev).eval()


def answer_budgeted(
    cfg: Config,
    final: Path | None,
    tok,
    systems: list[System],
    qs: tuple[Questions, Questions],
    addons: Addons,
    template,
    elapsed: Callable[[], float],
    tail_s: Callable[[dict[str, list[Answers]], int], float],
    dev: torch.device,
) -> tuple[dict[str, Answers], Budgeted]:
    """Every system's answers to the chunks eval.time_budget lets through, in eval.systems order."""
    test, probe = qs
    wanted = tuple(m for m in LOCAL_MODELS if any(s.model == m for s in systems))
    models, adapter = load_local(cfg, final, dev, wanted)
    by_name = {s.name: s for s in systems}

    def answer(name: str, chunk: Chunk) -> Answers:
        s = by_name[name]
        sub, sub_probe = subset(test, chunk.test), subset(probe, chunk.probe)
        extra = addons.subset(chunk.test, chunk.probe)
        if not s.local:
            return answer_endpoint(s, sub, sub_probe, extra, cfg)
        model = models[s.model]
        # the untouched base weights: LoRA's delta is skipped in every layer
        off = model.disable_adapter() if adapter and s.model == "base" else nullcontext()
        with off:
            return answer_local(model, tok, s, sub, sub_probe, extra, cfg, template)

    plan = plan_chunks(len(test.examples), len(probe.examples), cfg.eval.batch_size)
    got, rec = run_chunks(
        plan, [s.name for s in systems], answer, elapsed, float(cfg.eval.time_budget), tail_s
    )
    return {name: merged(parts) for name, parts in got.items()}, rec


def tail_estimator(
    cfg: Config, qs: tuple[Questions, Questions], systems: list[System], out: Path, embedder, clock
) -> Callable[[dict[str, list[Answers]], int], float]:
    """eval.time_budget's room after answering: scoring (text metrics, embeddings, the judge) and the report,
    measured once by doing both on the first chunk's answers (the report into a scratch dir); the scoring
    then grows with the questions answered, the report is taken as fixed."""
    measured: dict[str, float] = {}

    def tail_s(got: dict[str, list[Answers]], questions: int) -> float:
        if not measured:
            answers = {name: merged(parts) for name, parts in got.items()}
            first = next(iter(answers.values()))
            test, probe = subset(qs[0], range(len(first.test))), subset(qs[1], range(len(first.probe)))
            t = clock()
            # the judge caches in <run>/eval, so what it scores here is not paid for twice
            metrics, rows, probe_rows = summarize(cfg, answers, test, probe, out, [], embedder)
            scored = clock()
            metrics["systems"] = [s.name for s in systems]
            metrics["pairwise"] = pairwise(rows, probe_rows, metrics["systems"])
            with tempfile.TemporaryDirectory() as scratch:
                write_report(
                    Path(scratch), metrics, rows, None, "time budget: measuring the report", probe_rows
                )
            measured.update(
                score_s=scored - t, report_s=clock() - scored, questions=len(first.test + first.probe)
            )
        return measured["score_s"] * questions / max(measured["questions"], 1) + measured["report_s"]

    return tail_s


def recall_over(retrieval: dict, addons, data, probe: Questions, cfg: Config) -> dict:
    """Retrieval recall@k over the probe questions answered (the budget may have cut the probe)."""
    if retrieval.get("retrieval_recall") is None or addons.hits_probe is None:
        return retrieval
    from tunesmith.eval.addons import probe_recall

    hits = addons.hits_probe[: len(probe.examples)]
    return {**retrieval, "retrieval_recall": probe_recall(hits, data, probe, cfg.eval.rag.k)}
