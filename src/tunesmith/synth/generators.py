"""The LLM that writes the pairs: the `Generator` protocol, a local model or any OpenAI-compatible endpoint,
and the prompt (a worked example, then the chunk) that asks for them."""

from __future__ import annotations

import json
from typing import Protocol

from tunesmith.config import Config, GenerateConfig, SynthConfig, UserError
from tunesmith.data.documents import Chunk, word_spans
from tunesmith.endpoint import ChatClient, EndpointFailed
from tunesmith.synth.pairs import drop_cut_line

SYSTEM = "You write question-answer pairs that teach a model the content of a document."
PROMPT = """Passage from "{source}" (section: {heading}):
\"\"\"
{text}
\"\"\"

Write {n} question-answer pairs about this passage.
- Each question names its subject; never say "the passage" or "the text".
- Each answer is one or two sentences copied or paraphrased from the passage, adding nothing.
{reply}"""
# How to reply. Strong (remote) models follow JSON; SmolLM2-135M never did in our trials, but writes Q:/A:
# lines.
REPLY = {
    "json": "Reply with only a JSON array of {n} objects with the keys question and answer.",
    "lines": "Reply with {n} pairs as Q: and A: lines, nothing else.",
}
# A one-shot example turn before the real request: without it SmolLM2-135M copied the format's placeholders
# ("Q: [Question: 1]") or looped. A richer example (3 facts about a command) was copied verbatim into 5 of
# 8 replies; this plain one much less. Numbers: configs/docs-to-model.yaml.
EXAMPLE = Chunk(
    "acme/README.md#2",
    "acme/README.md",
    "acme > Install",
    "Install acme with `pip install acme`. It needs Python 3.9 or newer. The `acme check FILE` command "
    "validates a file and exits with code 1 when it finds an error.",
)
EXAMPLE_PAIRS = [
    {"question": "How do you install acme?", "answer": "Install acme with pip install acme."},
    {
        "question": "What does the acme check command do?",
        "answer": "acme check FILE validates a file and exits with code 1 when it finds an error.",
    },
    {"question": "Which Python version does acme need?", "answer": "acme needs Python 3.9 or newer."},
]


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
        return [
            tuple(s)
            for s in self.tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
                "offset_mapping"
            ]
        ]

    def complete(self, conversations: list[list[dict]], attempt: int) -> list[str]:
        from tunesmith.generate import generate

        if getattr(self.tok, "chat_template", None):
            ids = [
                self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
                for c in conversations
            ]
        else:  # a base model: plain text with a cue
            ids = [
                self.tok("\n\n".join(m["content"] for m in c) + "\n\n")["input_ids"] for c in conversations
            ]
        # a run of blank lines is where small models start looping: no pair comes after it
        g = retry_config(self.gen, attempt)
        g = g.model_copy(update={"stop": [*g.stop, "\n\n\n"]})
        return [
            drop_cut_line(c.text) if c.finish_reason == "length" else c.text
            for c in generate(self.model, self.tok, ids, g)
        ]


class RemoteGenerator:
    """Any OpenAI-compatible endpoint (endpoint.py's `ChatClient`), `concurrency` requests at a time."""

    def __init__(self, s: SynthConfig, gen: GenerateConfig):
        if not s.model:
            raise UserError(
                "synth.model: name the generator model at synth.base_url (e.g. synth.model=gpt-4o-mini)"
            )
        # HTTP retries (429, 5xx, timeouts) are the client's; synth.max_retries also bounds malformed-output
        # retries
        self.client = ChatClient(
            s.base_url,
            s.model,
            api_key_env=s.api_key_env,
            timeout_s=120.0,
            max_retries=s.max_retries,
            where="synth",
        )
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

        with ThreadPoolExecutor(
            self.s.concurrency
        ) as pool:  # the openai client is safe to share between threads
            return list(pool.map(lambda c: self._one(c, attempt), conversations))


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
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": _user(EXAMPLE, k, style)},
        {"role": "assistant", "content": _reply(EXAMPLE_PAIRS[:k], style)},
        {"role": "user", "content": _user(chunk, n, style)},
    ]
