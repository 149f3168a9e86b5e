"""Batching scheduler: requests that arrive together run in one batched `generate_batch` call.

One worker thread owns the models (generation never runs on the event loop, and adapter switching on a
shared PEFT base is safe because only this thread touches it). It takes the oldest waiting request, then
gathers compatible ones (same model, same sampling settings) for up to `max_wait_ms` or `max_batch_size`
requests. Requests may differ in max_tokens: the batch runs to the largest and each row stops at its own
limit. Results and stream pieces go back to the event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from tunesmith.config import GenerateConfig
from tunesmith.data.formats import Template
from tunesmith.generate import Completion, TextDelta, eos_ids, generate_batch


@dataclass
class LoadedModel:
    """A servable model. Several may share one PeftModel: `adapter` names the active adapter, None = base.

    For a plain (non-PEFT) model `adapter` is ignored.
    """

    name: str
    model: object
    tokenizer: object
    template: Template
    adapter: str | None = None

    @property
    def context_len(self) -> int:
        """Longest sequence the model takes (prompt + answer)."""
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    def activate(self):
        """Context in which `model` computes as this entry: its adapter on, or every adapter off."""
        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if self.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self.adapter)
        return contextlib.nullcontext()


@dataclass(eq=False)  # identity: a job is one request (and weak references need it hashable)
class Job:
    """One request waiting for, or in, a batch."""

    model: str
    prompt: list[int]
    cfg: GenerateConfig
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    pieces: asyncio.Queue | None = None  # streaming: str pieces, then the Completion (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def key(self) -> str:
        """Jobs with equal keys can share a batch (everything but the token limit must match)."""
        return self.model + json.dumps(
            self.cfg.model_dump(exclude={"max_new_tokens", "batch_size"}), sort_keys=True
        )

    def send(self, item: object) -> None:
        """Thread-safe hand-off to the event loop (a closed loop means nobody is listening any more)."""
        with contextlib.suppress(RuntimeError):
            if self.pieces is not None:
                self.loop.call_soon_threadsafe(self.pieces.put_nowait, item)
            else:
                self.loop.call_soon_threadsafe(_settle, self.future, item)


def _settle(fut: asyncio.Future, item: object) -> None:
    if fut.done():
        return
    if isinstance(item, BaseException):
        fut.set_exception(item)
    else:
        fut.set_result(item)


class Scheduler:
    """Queue + worker thread; `complete` and `stream` are awaited from request handlers."""

    def __init__(self, models: dict[str, LoadedModel], max_batch_size: int, max_wait_ms: float) -> None:
        self.models, self.max_batch, self.max_wait = models, max_batch_size, max_wait_ms / 1000
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.held: deque[Job] = deque()  # taken from the inbox but incompatible with the batch being built
        self.batches = 0  # batches run, and tokens generated (tests and the bench read them)
        self.generated_tokens = 0
        self.running = 0  # rows of the batch in flight (0: idle)
        self._jobs: weakref.WeakSet[Job] = (
            weakref.WeakSet()
        )  # every Job still alive: a leak shows up in stats()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the worker once (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="tunesmith-scheduler", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the worker after the batch in flight; jobs still waiting get an error, not silence."""
        if self._thread is not None:
            self.inbox.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        left = [j for j in list(self.held) + list(self.inbox.queue) if j is not None]
        self.held.clear()
        self.inbox = queue.Queue()
        for job in left:
            job.send(RuntimeError("the server shut down before this request was run"))

    def stats(self) -> dict[str, int]:
        """Jobs waiting, rows generating, and Job objects alive (all 0 when idle and nothing leaked)."""
        with self.inbox.mutex:
            inbox = list(self.inbox.queue)
        waiting = sum(1 for j in inbox + list(self.held) if j is not None)
        return {"waiting": waiting, "running": self.running, "live_jobs": len(self._jobs)}

    def _submit(self, model: str, prompt: list[int], cfg: GenerateConfig, streaming: bool) -> Job:
        self.start()
        loop = asyncio.get_running_loop()
        job = Job(model, prompt, cfg, loop, loop.create_future(), asyncio.Queue() if streaming else None)
        self._jobs.add(job)
        self.inbox.put(job)
        return job

    async def complete(self, model: str, prompt: list[int], cfg: GenerateConfig) -> Completion:
        """The whole answer; cancelling the awaiting task frees the row."""
        job = self._submit(model, prompt, cfg, streaming=False)
        try:
            return await job.future
        finally:
            job.cancelled.set()

    async def stream(
        self, model: str, prompt: list[int], cfg: GenerateConfig
    ) -> AsyncIterator[str | Completion]:
        """Text pieces, then the final Completion. Leaving early (client gone) frees the row."""
        job = self._submit(model, prompt, cfg, streaming=True)
        try:
            async for item in pieces_of(job.pieces):
                yield item
        finally:
            job.cancelled.set()

    def _next_batch(self) -> list[Job] | None:
        """Oldest job plus compatible ones arriving within max_wait; None = shut down."""
        first = self.held.popleft() if self.held else self.inbox.get()
        if first is None:
            return None
        batch = [first]
        for job in list(self.held):
            if len(batch) < self.max_batch and job.key() == first.key():
                self.held.remove(job)
                batch.append(job)
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                job = (
                    self.inbox.get(timeout=max(deadline - time.monotonic(), 0))
                    if self.max_wait
                    else self.inbox.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                self.inbox.put(None)  # seen again after this batch
                break
            (batch if job.key() == first.key() else self.held).append(job)
        return [j for j in batch if not j.cancelled.is_set()]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            self.running = len(batch)
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch must answer its clients, not kill the worker
                for job in batch:
                    job.send(e)
            finally:
                self.running = 0
            del (
                batch
            )  # the worker must not keep the last batch's jobs (and their futures) alive while it waits

    def _run(self, jobs: list[Job]) -> None:
        lm = self.models[jobs[0].model]
        limits = [j.cfg.max_new_tokens for j in jobs]
        cfg = jobs[0].cfg.model_copy(update={"max_new_tokens": max(limits), "batch_size": len(jobs)})
        eos = eos_ids(lm.model, lm.tokenizer)
        deltas = [TextDelta(lm.tokenizer, cfg.stop, eos) if j.pieces is not None else None for j in jobs]

        def on_token(row: int, tok: int) -> None:
            if deltas[row] is not None and (piece := deltas[row].push(tok)):
                jobs[row].send(piece)

        def cancelled(row: int) -> bool:
            return jobs[row].cancelled.is_set()

        self.batches += 1
        with torch.random.fork_rng(devices=[]), lm.activate():
            torch.manual_seed(cfg.seed)
            results = generate_batch(
                lm.model,
                lm.tokenizer,
                [j.prompt for j in jobs],
                cfg,
                on_token if any(deltas) else None,
                cancelled,
                limits,
            )
        self.generated_tokens += sum(len(r.ids) for r in results)
        for job, delta, result in zip(jobs, deltas, results, strict=True):
            if delta is not None and (rest := delta.flush()):
                job.send(rest)
            job.send(result)


async def pieces_of(pieces: asyncio.Queue) -> AsyncIterator[str | Completion]:
    """A streamed answer from its queue: text pieces, then the Completion; an exception put there is raised.

    Both engines (this scheduler and serve/llama_cpp.py) hand their worker thread's output over this way."""
    while True:
        item = await pieces.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if isinstance(item, Completion):
            return
