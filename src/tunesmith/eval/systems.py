"""The systems `compare` puts side by side: a model (base, tuned, endpoint:NAME) and a way of prompting it.

`eval.systems` names them (`tuned+rag`, `endpoint:gpt+fewshot`). Local systems generate through our `generate`
engine in length-sorted batches of eval.batch_size, each batch timed (every answer of a batch waited as long
as the batch took: that is its latency). Endpoint systems send the same chat messages, a request each, through
`endpoint.ChatClient.chat_many`, eval.endpoints.NAME.concurrency of them in flight at once (each answer's
latency is its own request's, queueing at the server included). Every system records what it cost per answer:
prompt tokens, latency, and for a local system the peak memory while answering (CUDA: the allocator's peak;
CPU: the process's peak RSS above its RSS when the system started, Linux only, else not recorded).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tunesmith.config import Config, GenerateConfig
from tunesmith.config.schema import system_parts
from tunesmith.eval.loss import evaluate_loss
from tunesmith.eval.prompts import chat_messages, fitted_prompt
from tunesmith.eval.questions import Questions
from tunesmith.generate import Completion, generate_batch
from tunesmith.model.load import pad_id
from tunesmith.runtime import autocast_dtype, peak_memory_since, print0, reset_peak_memory

LOCAL_MODELS = ("base", "tuned")


@dataclass(frozen=True)
class System:
    """One compared system: `model` is base | tuned | endpoint:NAME; the add-ons change only the prompt."""

    name: str
    model: str
    fewshot: bool = False
    rag: bool = False

    @property
    def plain(self) -> bool:
        """Asked exactly as training rendered the question (so answer-token loss means the same thing)."""
        return not (self.fewshot or self.rag)

    @property
    def local(self) -> bool:
        """A model this process loads (as opposed to an endpoint)."""
        return self.model in LOCAL_MODELS


def systems_of(cfg: Config) -> list[System]:
    """eval.systems parsed, in the configured order (the schema already refused unknown names)."""
    out = []
    for name in cfg.eval.systems:
        model, addons = system_parts(name)
        out.append(System(name, model, "fewshot" in addons, "rag" in addons))
    return out


@dataclass
class Addons:
    """What the add-ons put into each prompt: shots (training Examples) and passages, per question."""

    shots_test: list[list] = field(default_factory=list)
    shots_probe: list[list] = field(default_factory=list)
    hits_test: list[list] | None = None
    hits_probe: list[list] | None = None
    notes: list[str] = field(default_factory=list)

    def for_system(self, system: System, probe: bool) -> tuple[list[list], list[list] | None]:
        """(shots per question, passages per question or None) for this system's prompts."""
        shots = (self.shots_probe if probe else self.shots_test) if system.fewshot else []
        hits = (self.hits_probe if probe else self.hits_test) if system.rag else None
        return shots, hits

    def subset(self, test: Sequence[int], probe: Sequence[int]) -> Addons:
        """The shots and passages of the questions at these indices (eval.time_budget's chunks)."""

        def pick(rows: list[list] | None, idx: Sequence[int]) -> list[list] | None:
            return [rows[i] for i in idx] if rows else rows  # [] (no few-shot) or None (no RAG) stays

        return Addons(
            pick(self.shots_test, test) or [],
            pick(self.shots_probe, probe) or [],
            pick(self.hits_test, test),
            pick(self.hits_probe, probe),
            self.notes,
        )


@dataclass
class Answers:
    """One system's outputs and their costs; per-answer lists run over the test questions, then the probe."""

    test: list[Completion]
    probe: list[Completion]
    loss: dict
    seconds: float
    lm_eval: dict = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    prompt_tokens: list[int | None] = field(default_factory=list)
    completion_tokens: list[int | None] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    dropped_shots: int = 0


def eval_generate_config(cfg: Config) -> GenerateConfig:
    """cfg.generate, greedy, with the eval answer cap and batch size: identical for every model compared."""
    return cfg.generate.model_copy(
        update={
            "max_new_tokens": cfg.eval.max_new_tokens,
            "temperature": 0.0,
            "batch_size": cfg.eval.batch_size,
        }
    )


def timed_generate(
    model, tok, prompts: list[list[int]], gen: GenerateConfig, progress: bool = False
) -> tuple[list[Completion], list[float]]:
    """`generate`'s batching (length-sorted, gen.batch_size), each batch timed: (completions, latencies)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + gen.batch_size] for i in range(0, len(order), gen.batch_size)]
    results: list = [None] * len(prompts)
    latencies = [0.0] * len(prompts)
    steps = batches
    if progress and batches:
        from rich.progress import track

        steps = track(batches, description=f"generating {len(prompts)} answers (batch {gen.batch_size})")
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # seeded sampling without disturbing the caller's RNG
        torch.manual_seed(gen.seed)
        for batch in steps:
            t0 = time.perf_counter()
            done = generate_batch(model, tok, [prompts[i] for i in batch], gen)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the batch is over when the GPU is, not when the launch returns
            took = time.perf_counter() - t0
            for i, c in zip(batch, done, strict=True):
                results[i], latencies[i] = c, took
    return results, latencies


def context_budget(model, max_new_tokens: int) -> int | None:
    """Prompt tokens that leave room for the answer in the model's context (None: the model does not say)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n - max_new_tokens if isinstance(n, int) and n > max_new_tokens else None


def system_prompts(
    system: System, qs: Questions, addons: Addons, probe: bool, template, tok, budget: int | None
) -> tuple[list[list[int]], int]:
    """(prompt ids per question, shots dropped to fit the context) for a local system."""
    if system.plain:
        return qs.prompts, 0
    shots, hits = addons.for_system(system, probe)
    out, dropped = [], 0
    for i, ex in enumerate(qs.examples):
        ids, n = fitted_prompt(
            ex, template, tok, shots[i] if shots else [], hits[i] if hits else None, budget
        )
        out.append(ids)
        dropped += n
    return out, dropped


def answer_local(
    model,
    tok,
    system: System,
    test: Questions,
    probe: Questions,
    addons: Addons,
    cfg: Config,
    template,
) -> Answers:
    """Greedy answers of one local system to the test questions and the probe, timed per batch."""
    gen = eval_generate_config(cfg)
    budget = context_budget(model, gen.max_new_tokens)
    test_prompts, dropped = system_prompts(system, test, addons, False, template, tok, budget)
    probe_prompts, dropped_probe = system_prompts(system, probe, addons, True, template, tok, budget)
    prompts = test_prompts + probe_prompts
    print0(
        f"{system.name}: answering {len(test_prompts)} test questions"
        + (f" + {len(probe_prompts)} probe" if probe_prompts else "")
    )
    dev = next(model.parameters()).device
    start = reset_peak_memory(dev)
    t0 = time.perf_counter()
    out, latencies = timed_generate(model, tok, prompts, gen, progress=True)
    seconds = time.perf_counter() - t0
    peak = peak_memory_since(dev, start)
    loss: dict = {}
    if system.plain and test.samples:  # loss of the training prompt only: an add-on prompt is another task
        amp = autocast_dtype(cfg.train.precision, dev)
        loss = evaluate_loss(
            model,
            test.samples,
            cfg.eval.batch_size,
            cfg.data.max_length,
            pad_id(tok),
            cfg.data.packing,
            dev,
            amp,
        )
    n = len(test_prompts)
    return Answers(
        out[:n],
        out[n:],
        loss,
        seconds,
        latencies=latencies,
        prompt_tokens=[len(p) for p in prompts],
        completion_tokens=[len(c.ids) for c in out],
        peak_memory_bytes=peak,
        dropped_shots=dropped + dropped_probe,
    )


def answer_endpoint(
    system: System, test: Questions, probe: Questions, addons: Addons, cfg: Config
) -> Answers:
    """endpoint:NAME's answers to the same questions as chat messages (+ shots/passages), a request each."""
    from tunesmith.endpoint import chat_client

    name = system.model.split(":", 1)[1]
    ep = cfg.eval.endpoints[name]
    gen = eval_generate_config(cfg)
    conversations, labels = [], []
    for qs, is_probe in ((test, False), (probe, True)):
        shots, hits = addons.for_system(system, is_probe)
        for i, ex in enumerate(qs.examples):
            conversations.append(chat_messages(ex, shots[i] if shots else [], hits[i] if hits else None))
            labels.append(f"{ex.where}: {qs.questions[i]}")
    print0(
        f"{system.name}: asking {ep.model} at {ep.base_url} {len(conversations)} questions, "
        f"{ep.concurrency} at a time"
    )
    t0 = time.perf_counter()
    with chat_client(ep, f"eval.endpoints.{name}") as client:
        replies = client.chat_many(
            conversations,
            concurrency=ep.concurrency,
            max_tokens=gen.max_new_tokens,
            temperature=0.0,
            stop=gen.stop or None,
            labels=labels,
        )
    seconds = time.perf_counter() - t0
    out = [
        Completion([], r.text, "length" if r.finish_reason == "length" else "stop", r.prompt_tokens or 0)
        for r in replies
    ]
    n = len(test.examples)
    return Answers(
        out[:n],
        out[n:],
        {},
        seconds,
        latencies=[r.latency_s for r in replies],  # each request's own time, however many were in flight
        prompt_tokens=[r.prompt_tokens for r in replies],
        completion_tokens=[r.completion_tokens for r in replies],
    )


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks; None for no values.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    """
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cost_summary(a: Answers) -> dict:
    """Per-answer costs of one system: prompt tokens, completion tokens, latency p50/p95, memory."""
    known = [t for t in a.prompt_tokens if t is not None]
    made = [t for t in a.completion_tokens if t is not None]
    n = len(a.latencies)
    out = {
        "prompt_tokens": sum(known) / len(known) if known else None,
        "completion_tokens": sum(made) / len(made) if made else None,
        "latency_p50_s": percentile(a.latencies, 50),
        "latency_p95_s": percentile(a.latencies, 95),
        "seconds_per_answer": a.seconds / n if n else None,
    }
    if a.peak_memory_bytes is not None:
        out["peak_memory_gb"] = a.peak_memory_bytes / 2**30
    return out
