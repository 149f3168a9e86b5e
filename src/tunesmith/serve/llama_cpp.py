"""The llama.cpp engine (`serve.engine: llama.cpp`): a GGUF file served as is by llama-cpp-python, behind the
same OpenAI routes, limits and error bodies as tunesmith's engine.

What the user ships is what answers: a chat prompt is rendered by the GGUF's embedded chat template through
llama-cpp-python's own Jinja formatter (built from the GGUF's metadata exactly as
`Llama.create_chat_completion` builds it), and tokens are sampled by llama.cpp's sampler chain. Only the
request plumbing is ours: stop strings are cut and streamed by `generate.TextDelta`, as on our engine, so the
pieces of a stream join to the non-streamed text and usage counts the real generated ids.

A llama.cpp context is not thread-safe, so each GGUF model has one worker thread: its requests run one at a
time, in arrival order, off the event loop (no batching across requests on this engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tunesmith.config import Config, GenerateConfig, UserError
from tunesmith.generate import Completion, TextDelta
from tunesmith.model.resolve import gguf_source
from tunesmith.runtime import has_amx
from tunesmith.serve.scheduler import pieces_of


def gguf_file(name: str, spec: str) -> Path | None:
    """The GGUF file serve.models.<name> names (a .gguf path, a packaged short name, or a directory holding
    exactly one .gguf, e.g. an `export --gguf` dir); None for anything else (HF dirs, runs, hub ids)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_file():
        raise UserError(f"serve.models.{name}: GGUF file {spec} not found (check the path)")
    found = gguf_source(spec)
    if found is not None:
        return found
    files = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(files) > 1:
        raise UserError(
            f"serve.models.{name}: {spec} holds {len(files)} GGUF files "
            f"({', '.join(f.name for f in files)}); "
            f"name the one to serve, e.g. serve.models.{name}={path / files[0].name}"
        )
    return files[0] if files else None


def load_gguf(name: str, path: Path, cfg: Config) -> GgufModel:
    """Open `path` with llama.cpp: n_ctx from data.max_length when the config sets it (the length the model
    was trained at), else the GGUF's own context; one thread per core; UserError when it will not load."""
    try:
        import llama_cpp  # noqa: F401 (here only to say clearly that it is missing)
    except ImportError:
        raise UserError(
            "serve.engine: llama.cpp needs llama-cpp-python "
            "(run `make`, or pip install llama-cpp-python==0.3.36)"
        ) from None
    n_ctx = cfg.data.max_length if "max_length" in cfg.data.model_fields_set else 0  # 0: the GGUF's context
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        llm = open_gguf(path, n_ctx, cores)
    except (ValueError, RuntimeError) as e:  # llama-cpp-python reports an unreadable model as ValueError
        raise UserError(
            f"serve.models.{name}: llama.cpp could not load {path} ({e}); is it a GGUF file "
            "(e.g. from `tunesmith export --gguf`)?"
        ) from None
    return GgufModel(name, path, llm)


def open_gguf(path: Path, n_ctx: int, threads: int):
    """`llama_cpp.Llama` over `path`; llama.cpp's extra weight buffers (AMX/CPU repacking) off on AMX CPUs.

    llama-cpp-python 0.3.36 built here (GGML_NATIVE) segfaults in `decode` on a CPU with AMX (measured on a
    2-core Intel Xeon with amx_bf16/amx_int8: f16 and q8_0 GGUFs of tiny Llama/NeoX models) and decodes
    correctly with `use_extra_bufts` off. Its `Llama()` does not expose that field, so the default model
    params it reads are wrapped for the duration of the load (loads happen once, at start-up).
    """
    import llama_cpp
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    if has_amx():
        llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


class _Detokenizer:
    """The `decode` that `TextDelta` calls, over llama.cpp's detokenizer (special tokens left out)."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # "replace": an incomplete UTF-8 tail shows as U+FFFD, which TextDelta holds back until it completes
        return self.llm.detokenize(ids, special=not skip_special_tokens).decode("utf-8", "replace")


class GgufModel:
    """A GGUF model served by llama.cpp: one `Llama` context, one worker thread that owns it."""

    def __init__(self, name: str, path: Path, llm) -> None:
        import llama_cpp

        self.name, self.path, self.llm = name, path, llm
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama.cpp-{name}")
        self.generated_tokens = 0  # over all requests (tests and the bench read it)
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._chat, self._eos_text = _chat_formatter(llm)

    @property
    def context_len(self) -> int:
        """Longest sequence the context takes (prompt + answer)."""
        return self.llm.n_ctx()

    def encode(self, text: str) -> list[int]:
        """Raw text -> prompt ids as llama.cpp's create_completion tokenizes it (BOS if the GGUF adds one)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages -> prompt ids by the GGUF's chat template, tokenized as create_chat_completion does."""
        import jinja2

        if self._chat is None:
            raise UserError(
                f"{self.path.name} carries no chat template (tokenizer.chat_template): use /v1/completions, "
                "or serve a GGUF written by `tunesmith export --gguf`, which embeds one"
            )
        try:
            rendered = self._chat(messages=messages)
        except (ValueError, jinja2.TemplateError) as e:  # the template's raise_exception() is a ValueError
            raise UserError(f"the GGUF's chat template refused the conversation ({e})") from None
        return self.llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )

    async def complete(self, model: str, prompt: list[int], cfg: GenerateConfig) -> Completion:
        """The whole answer (the Scheduler's signature); cancelling the awaiting task stops generation."""
        cancelled = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self._run, prompt, cfg, cancelled, None
            )
        finally:
            cancelled.set()

    async def stream(
        self, model: str, prompt: list[int], cfg: GenerateConfig
    ) -> AsyncIterator[str | Completion]:
        """Text pieces, then the final Completion. Leaving early (client gone) stops generation."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def send(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
                loop.call_soon_threadsafe(pieces.put_nowait, item)

        def run() -> None:
            try:
                send(self._run(prompt, cfg, cancelled, send))
            except Exception as e:  # noqa: BLE001 - handed to the request, which answers it as an error event
                send(e)

        worker = loop.run_in_executor(self._pool, run)
        try:
            async for item in pieces_of(pieces):
                yield item
        finally:
            cancelled.set()
            worker.cancel()  # still queued behind another request: never starts

    def _run(
        self,
        prompt: list[int],
        g: GenerateConfig,
        cancelled: threading.Event,
        send: Callable[[str], None] | None,
    ) -> Completion:
        """One request, in the worker thread: llama.cpp samples, TextDelta cuts stop strings and streams."""
        import llama_cpp

        llm = self.llm
        delta = TextDelta(_Detokenizer(llm), [*g.stop, self._eos_text], eos=[])
        text, finish = [], "length"
        # llama.cpp seeds with a uint32; the request's seed may be any int64/uint64
        llm.set_seed(g.seed % 2**32)
        tokens = llm.generate(
            prompt,
            top_k=g.top_k,  # 0: off, as in our engine
            top_p=g.top_p,
            min_p=0.0,  # our engine has no min-p; llama.cpp's default (0.05) would change what is sampled
            temp=g.temperature,  # 0: greedy
            repeat_penalty=g.repetition_penalty,  # llama.cpp penalises the last 64 tokens, HF all of them
        )
        try:
            for token in tokens:
                if cancelled.is_set() or llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                self.generated_tokens += 1
                text.append(delta.push(token))
                if send is not None and text[-1]:
                    send(text[-1])
                if delta.done:
                    finish = "stop"
                    break
                if len(delta.ids) >= g.max_new_tokens:
                    break
        finally:
            tokens.close()
        text.append(delta.flush())
        if send is not None and text[-1]:
            send(text[-1])
        return Completion(list(delta.ids), "".join(text), finish, len(prompt))

    def close(self) -> None:
        """Finish the request in flight, then free the context."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.llm.close()


def _chat_formatter(llm):
    """(formatter, EOS text): llama-cpp-python's Jinja formatter over the GGUF's `tokenizer.chat_template`,
    made as `Llama.__init__` makes it, so the prompt equals create_chat_completion's (None without one)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token: int) -> str:
        return "" if token == -1 else llm.detokenize([token], special=True).decode("utf-8", "replace")

    eos = llm.token_eos()
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None, text(eos)
    formatter = Jinja2ChatFormatter(
        template=template, eos_token=text(eos), bos_token=text(llm.token_bos()), stop_token_ids=[eos]
    )
    return formatter, text(eos)
