"""Record schemas (qa, alpaca, chat, text) -> Example, and the prompt templates that turn them into text.

A Template is data, not code: it is saved with the model (final/tunesmith_template.json) so generation and
serving render prompts exactly as training did.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from tunesmith.data.rejects import Rejects
from tunesmith.data.row import Row

# The fields each format needs; the last one is the response (it carries the loss).
REQUIRED = {
    "qa": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "chat": ("messages",),
}
OPTIONAL = {"alpaca": ("input",)}
RESPONSE_FIELD = {"qa": "answer", "alpaca": "output", "text": "text", "chat": "messages"}
# A JSON escape such as "\ud800" decodes to half a UTF-16 pair: Python keeps it, but it is no text, and the
# tokenizer and every UTF-8 writer (cache, rejects report) fail on it far from the row.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_CAUSE = "field '{}' holds an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF escape that is not text)"

# The two standard Alpaca prompts (Taori et al. 2023), chosen per row by whether `input` is non-empty.
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
BUILTIN = {
    "qa": "### Question:\n{question}\n\n### Answer:\n",
    "alpaca": ALPACA_INPUT,
    "text": "",
}


@dataclass
class Example:
    """One validated record: string fields (qa/alpaca/text) or a message list (chat)."""

    where: str
    fields: dict[str, str] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Template:
    """How an Example becomes prompt text + response text.

    kind="string": `prompt` is a format string over the example's fields; `prompt_no_input` is used instead
    when the row's `input` is empty (Alpaca). kind="chat": the tokenizer's chat template renders messages.
    """

    format: str
    kind: str  # "string" | "chat"
    prompt: str = ""
    prompt_no_input: str | None = None
    response_field: str = "answer"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Template:
        return Template(**d)


def get_template(name: str, fmt: str) -> Template:
    """data.template (+ data.format) -> Template. A string with {field} placeholders is a user template."""
    if name == "chat" or fmt == "chat":
        if fmt == "text":
            from tunesmith.config import UserError

            raise UserError("data.template=chat does not apply to data.format=text (raw text has no turns)")
        return Template(format=fmt, kind="chat", response_field=RESPONSE_FIELD[fmt])
    if name == "alpaca" or (fmt == "alpaca" and name == "qa"):
        # `qa` is the default template name; for alpaca records the Alpaca prompts are the natural default.
        return Template(
            format=fmt,
            kind="string",
            prompt=ALPACA_INPUT,
            prompt_no_input=ALPACA_NO_INPUT,
            response_field=RESPONSE_FIELD[fmt],
        )
    if fmt == "text" or name == "text":
        return Template(format=fmt, kind="string", prompt="", response_field="text")
    text = BUILTIN.get(name, name)
    if name not in BUILTIN and "{" not in name:
        from tunesmith.config import UserError

        raise UserError(
            f"data.template '{name}' is neither a built-in ({', '.join([*BUILTIN, 'chat'])}) "
            "nor a string with {field} placeholders"
        )
    return Template(format=fmt, kind="string", prompt=text, response_field=RESPONSE_FIELD[fmt])


def to_example(row: Row, fmt: str, rejects: Rejects) -> Example | None:
    """Validate one Row against the format's schema; a bad row goes to `rejects` (raise or record) -> None."""
    fields = row.fields
    required = REQUIRED[fmt]
    for name in required:
        if fields.get(name) is None:  # absent or null
            rejects.bad(row.where, name, f"missing field '{name}'", fields)
            return None
    if fmt == "chat":
        return _chat_example(row, rejects)
    out = {}
    for name in required + OPTIONAL.get(fmt, ()):
        value = fields.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            rejects.bad(
                row.where, name, f"field '{name}' must be a string (got {type(value).__name__})", fields
            )
            return None
        if name in required and not value.strip():
            rejects.bad(row.where, name, f"field '{name}' is empty", fields)
            return None
        out[name] = value
    # Keep extra string fields: user templates may reference them, and reports show them.
    for name, value in fields.items():
        if name not in out and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            out[name] = value if isinstance(value, str) else str(value)
    bad = _not_text(out)
    if bad is not None:
        rejects.bad(
            row.where, bad, _SURROGATE_CAUSE.format(bad.encode("utf-8", "backslashreplace").decode()), fields
        )
        return None
    return Example(where=row.where, fields=out)


def _not_text(fields: dict[str, str]) -> str | None:
    """The first field whose name or value holds a lone surrogate, else None (ASCII is checked for free)."""
    for name, value in fields.items():
        if not (value.isascii() and name.isascii()) and (_SURROGATE.search(value) or _SURROGATE.search(name)):
            return name
    return None


def _chat_example(row: Row, rejects: Rejects) -> Example | None:
    messages = row.fields["messages"]
    if not isinstance(messages, list) or not messages:
        rejects.bad(
            row.where, "messages", "field 'messages' must be a non-empty list of {role, content}", row.fields
        )
        return None
    clean = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            rejects.bad(
                row.where,
                "messages",
                f"messages[{i}] must be an object with string 'role' and 'content'",
                row.fields,
            )
            return None
        if m["role"] not in ("system", "user", "assistant"):
            rejects.bad(
                row.where,
                "messages",
                f"messages[{i}].role '{m['role']}' is not system/user/assistant",
                row.fields,
            )
            return None
        if _not_text({"content": m["content"]}) is not None:
            rejects.bad(
                row.where,
                "messages",
                f"messages[{i}].content holds an unpaired UTF-16 surrogate "
                "(a \\uD800-\\uDFFF escape that is not text)",
                row.fields,
            )
            return None
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        rejects.bad(row.where, "messages", "no non-empty assistant message to learn from", row.fields)
        return None
    return Example(where=row.where, messages=clean)


def prompt_format(example: Example, template: Template) -> str:
    """The format string of this example's prompt: Alpaca rows with an empty `input` get the no-input one."""
    if template.prompt_no_input is not None and not example.fields.get("input", "").strip():
        return template.prompt_no_input
    return template.prompt


def prompt_text(example: Example, template: Template) -> str:
    """The prompt part of a string-template example (everything before the response)."""
    if template.format == "text":
        return ""
    try:
        return prompt_format(example, template).format(**example.fields)
    except KeyError as e:
        from tunesmith.config import UserError

        raise UserError(
            f"{example.where}: template needs field {e} which the row does not have "
            "(data.template / data.fields)"
        ) from None


def as_messages(example: Example) -> list[dict[str, str]]:
    """Any example as chat messages (qa/alpaca become one user turn and one assistant turn)."""
    if example.messages is not None:
        return example.messages
    f = example.fields
    if "question" in f:
        return [{"role": "user", "content": f["question"]}, {"role": "assistant", "content": f["answer"]}]
    user = f["instruction"] + (f"\n\n{f['input']}" if f.get("input", "").strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": f["output"]}]


def prompt_key(example: Example) -> str:
    """The text that identifies an example's prompt (split side, leakage, dedupe)."""
    if example.messages is not None:
        return "\n".join(m["content"] for m in example.messages if m["role"] != "assistant")
    f = example.fields
    if "question" in f:
        return f["question"]
    if "instruction" in f:
        return f["instruction"] + "\n" + f.get("input", "")
    return f.get("text", "")
