"""Batched generation over token ids: left padding, greedy or seeded sampling, EOS and stop strings, streams.

The engine knows only ids. `model.generate` (with its KV cache) does the decoding; the batching is ours:
prompts are sorted by length so a batch pads little, left-padded so every row's next token sits at the same
position, and results come back in input order. Stop strings are checked per row by a stopping criterion,
so one row can finish while the rest of its batch goes on.

Below the engine, one small bridge from requests to ids: `template_for` (the template a model was trained
with), `prompt_ids` (a conversation -> prompt ids through data/render.py's `render_prompt`) for the
`generate`/`chat` commands, and `conversation_ids` for the server (string templates keep earlier turns).
The commands themselves (argv, files, the REPL) live in cli.py.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunesmith.config import Config, GenerateConfig
from tunesmith.data.formats import Example, Template, get_template
from tunesmith.data.render import render_fewshot, render_prompt
from tunesmith.model.load import pad_id

OnToken = Callable[[int, int], None]  # (row, token id) for each new token of a row still running
Cancelled = Callable[[int], bool]  # row -> stop it now (a client went away)


@dataclass
class Completion:
    """One generated answer: its ids (EOS excluded), text (cut at a stop string) and why it ended."""

    ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus every EOS id in the model's generation config (chat models have several)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class TextDelta:
    """Incremental decoding of one row: push ids, get the text that is safe to show so far.

    Text is held back while it ends in an incomplete UTF-8 character or in a prefix of a stop string, so
    the pieces joined equal `cut_at_stop(decode(ids))` - the same text `generate` returns.
    """

    def __init__(self, tokenizer, stop: list[str], eos: list[int]) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, [s for s in stop if s], set(eos)
        self.ids: list[int] = []
        self.sent = 0
        self.done = False

    def push(self, token: int) -> str:
        """Add one generated id; return the new text that can be shown."""
        if self.done:
            return ""
        if token in self.eos:
            self.done = True
            return self.flush()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut, hit = cut_at_stop(text, self.stop)
        if hit:
            self.done = True
            return self._send(cut, len(cut))
        end = len(text.rstrip("\ufffd"))  # U+FFFD: a multibyte character still incomplete
        hold = 0
        for s in self.stop:  # hold back a tail that may grow into a stop string
            hold = max(
                [hold] + [k for k in range(1, min(len(s) - 1, end) + 1) if text[end - k : end] == s[:k]]
            )
        return self._send(text, end - hold)

    def flush(self) -> str:
        """The rest of the text once the row has ended."""
        text = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop)[0]
        return self._send(text, len(text))

    def _send(self, text: str, end: int) -> str:
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class _RowStop(StoppingCriteria):
    """Per-row stop: EOS, a stop string in the new text, or cancellation. Records where each row ended."""

    def __init__(
        self,
        tokenizer,
        stop: list[str],
        eos: list[int],
        prompt_len: int,
        cancelled: Cancelled | None,
        limits: list[int] | None,
    ):
        self.tokenizer, self.stop, self.eos = tokenizer, [s for s in stop if s], set(eos)
        self.prompt_len, self.cancelled, self.limits = prompt_len, cancelled, limits
        # a stop string spans at most ~4 tokens per character (byte-level BPE splits multibyte characters)
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 8
        self.ended: dict[int, int] = {}  # row -> generated length when it stopped
        self.limited: set[int] = set()  # rows that ended at their own token limit (finish_reason "length")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[1] - self.prompt_len  # tokens generated so far; input_ids is (B, T + n)
        last = input_ids[:, -1].tolist()
        for row in range(input_ids.shape[0]):
            if row in self.ended:
                continue
            if last[row] in self.eos or (self.cancelled is not None and self.cancelled(row)):
                self.ended[row] = n
            elif self.limits is not None and n >= self.limits[row]:
                self.ended[row] = n
                self.limited.add(row)
            elif self.stop:
                tail = self.tokenizer.decode(
                    input_ids[row, -min(n, self.window) :].tolist(), skip_special_tokens=True
                )
                if any(s in tail for s in self.stop):
                    self.ended[row] = n
        done = [row in self.ended for row in range(input_ids.shape[0])]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _StepStreamer(BaseStreamer):
    """Hands each new token of each still-running row to `on_token` (generate calls put() once per step)."""

    def __init__(self, on_token: OnToken, rows: _RowStop) -> None:
        self.on_token, self.rows, self.step = on_token, rows, -1

    def put(self, value: torch.Tensor) -> None:
        self.step += 1
        if self.step == 0:  # the first put is the (B, T) prompt
            return
        # (B,) new tokens; a row that ended at an earlier step gets padding now. transformers 5 runs the
        # stopping criteria before put(), so compare steps rather than asking "has this row ended".
        for row, tok in enumerate(value.reshape(-1).tolist()):
            if self.rows.ended.get(row, self.step) >= self.step:
                self.on_token(row, tok)

    def end(self) -> None:
        pass


_GREEDY_BELOW = 1e-4


def _sampling_args(cfg: GenerateConfig) -> dict:
    # Sampling knobs are passed explicitly so a model's generation_config.json (e.g. top_k=50) cannot leak in;
    # top_k=0 switches the top-k filter off.
    # Below _GREEDY_BELOW sampling is argmax in all but name, and logits / T would overflow float32 to inf
    # (NaN probabilities): such a temperature decodes greedily, for every caller (serve, the CLI, synth).
    if cfg.temperature < _GREEDY_BELOW:
        return {"do_sample": False, "repetition_penalty": cfg.repetition_penalty}
    return {
        "do_sample": True,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "repetition_penalty": cfg.repetition_penalty,
    }


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    on_token: OnToken | None = None,
    cancelled: Cancelled | None = None,
    limits: list[int] | None = None,
) -> list[Completion]:
    """One `model.generate` call on these prompts (left-padded, in this order).

    Hooks for the server: `on_token(row, id)` streams, `cancelled(row)` ends a row early, `limits[row]` is a
    per-row max_new_tokens (cfg.max_new_tokens must be their maximum).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: empty prompt (render at least one token, e.g. BOS)")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, T)
    eos = eos_ids(model, tokenizer)
    rows = _RowStop(tokenizer, cfg.stop, eos, width, cancelled, limits)
    streamer = _StepStreamer(on_token, rows) if on_token is not None else None
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([rows]),
            streamer=streamer,
            use_cache=True,
            **_sampling_args(cfg),
        )
    results = []
    for row, prompt in enumerate(prompts):
        ids = out[row, width:].tolist()
        ids = ids[: rows.ended.get(row, len(ids))]
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        text, hit = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), cfg.stop)
        stopped = (row in rows.ended and row not in rows.limited) or hit  # else it ran out of tokens
        results.append(Completion(ids, text, "stop" if stopped else "length", len(prompt)))
    return results


def generate(
    model, tokenizer, prompts: list[list[int]], cfg: GenerateConfig, progress: bool = False
) -> list[Completion]:
    """Generate for every prompt: length-sorted batches of cfg.batch_size; results in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    results: list[Completion | None] = [None] * len(prompts)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # seeded sampling without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        for batch in _progress(batches, progress, len(prompts), cfg.batch_size):
            for i, c in zip(
                batch, generate_batch(model, tokenizer, [prompts[i] for i in batch], cfg), strict=True
            ):
                results[i] = c
    return results  # type: ignore[return-value]


def _progress(batches: list, show: bool, total: int, size: int):
    if not show:
        return batches
    from rich.progress import track

    return track(batches, description=f"generating {total} answers (batch {size})")


def stream(model, tokenizer, prompt_ids: list[int], cfg: GenerateConfig) -> Iterator[str]:
    """Text pieces of one answer as they are generated; closing the iterator stops generation."""
    pieces: queue.Queue = queue.Queue()
    delta = TextDelta(tokenizer, cfg.stop, eos_ids(model, tokenizer))
    stop = threading.Event()
    failure: list[BaseException] = []

    def on_token(row: int, tok: int) -> None:
        piece = delta.push(tok)
        if piece:
            pieces.put(piece)

    def work() -> None:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                generate_batch(
                    model, tokenizer, [prompt_ids], cfg, on_token, lambda row: stop.is_set() or delta.done
                )
            rest = delta.flush()
            if rest:
                pieces.put(rest)
        except BaseException as e:  # handed to the consumer thread, which re-raises it
            failure.append(e)
        finally:
            pieces.put(None)

    worker = threading.Thread(target=work, name="tunesmith-stream", daemon=True)
    worker.start()
    try:
        while (piece := pieces.get()) is not None:
            yield piece
        if failure:
            raise failure[0]
    finally:
        stop.set()
        worker.join()


# ---- requests -> prompt ids: the one home for "messages + the trained template" (serve, generate, chat) ----


def template_for(stored: dict | None, cfg: Config) -> Template:
    """The template saved with a model (final/tunesmith_template.json), else the config's data template."""
    if stored is None:
        return get_template(cfg.data.template, cfg.data.format)
    # tunesmith_template.json holds {"template": Template.to_dict(), "max_length", ...}
    return Template.from_dict(stored.get("template", stored))


def prompt_ids(template: Template, tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation -> prompt ids as training rendered them (string templates take the last user turn)."""
    if template.kind == "chat":
        return render_prompt(Example(where="request", messages=messages), template, tokenizer)
    text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if template.format == "text":  # raw-text models continue the text as given
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    return render_prompt(Example(where="request", fields=_turn_fields(template, text)), template, tokenizer)


def conversation_ids(
    template: Template, tokenizer, messages: list[dict[str, str]], room: int | None = None
) -> list[int]:
    """A served conversation -> prompt ids: a string template also keeps the earlier turns, as few-shot shots.

    Each earlier user turn answered by the assistant turn right after it is rendered as a whole training
    example, exactly as compare's +fewshot renders a shot (`render_fewshot`); like compare's shots, the
    oldest are dropped while the prompt is longer than `room` tokens. A system turn has no place in a
    string template and is left out, as `prompt_ids` always did; so is an earlier user turn with no answer
    after it (or an answer with no user turn before it). Chat templates and raw text: `prompt_ids`.
    """
    if template.kind == "chat" or template.format == "text":
        return prompt_ids(template, tokenizer, messages)
    turns = [m for m in messages if m["role"] != "system"]
    last = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=0)
    shots = [
        Example(where="request", fields=_turn_fields(template, user["content"], answer["content"]))
        for user, answer in zip(turns[:last], turns[1:last])  # each adjacent pair before the question
        if user["role"] == "user" and answer["role"] == "assistant"
    ]
    if not shots:
        return prompt_ids(template, tokenizer, messages)
    question = Example(where="request", fields=_turn_fields(template, turns[last]["content"]))
    ids = render_fewshot(shots, question, template, tokenizer)
    while room is not None and len(ids) > room and shots:
        shots = shots[1:]
        ids = render_fewshot(shots, question, template, tokenizer)
    return ids


def _turn_fields(template: Template, user: str, answer: str | None = None) -> dict[str, str]:
    """A user turn (and the answer to it) as the fields of the template's record format."""
    fields = {"instruction": user, "input": ""} if template.format == "alpaca" else {"question": user}
    return fields if answer is None else {**fields, template.response_field: answer}
