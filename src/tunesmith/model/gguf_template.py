"""The prompt format a GGUF export carries: Jinja chat template, stop strings, Ollama Modelfile, README.

A model trained with `data.template: chat` keeps its tokenizer's own Jinja template. A string template (qa,
alpaca, a user format string) becomes a Jinja template that renders a chat request exactly as tunesmith's
server does (`generate.conversation_ids`): BOS where the tokenizer adds one, each earlier user turn answered
by the assistant turn right after it as a whole few-shot example followed by a blank line (`render_fewshot`),
then the last user turn as the prompt. System messages are left out, as tunesmith leaves them out: a string
template has no place for them. The Ollama TEMPLATE is the same program in Go's text/template; for a chat
template it is the text each turn starts with, found by rendering probe conversations (none when the template
is not that simple).

BOS: llama.cpp tokenizes the rendered prompt with special tokens parsed and adds BOS itself when the GGUF says
`add_bos_token`; llama-server (--jinja) first strips a leading BOS text the template rendered, and
llama-cpp-python's Jinja2ChatFormatter marks its prompt as already holding its specials (no second BOS). So
the Jinja template renders `bos_token` exactly where tunesmith's ids start with BOS, and the Ollama template
never does (Ollama's runner adds BOS when tokenizing, and strips nothing).
"""

from __future__ import annotations

import string
from pathlib import Path

from tunesmith.config import GenerateConfig, UserError
from tunesmith.data.formats import Template
from tunesmith.data.render import SHOT_SEPARATOR

# Two-character sequences a Jinja or Go lexer could read as a tag delimiter: template literals are split
# between their characters, so no literal (even inside a quoted string) contains one.
_DELIMITERS = ("{{", "{%", "{#", "}}", "%}", "#}")
_JINJA_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _as_template(template: dict) -> Template:
    # final/tunesmith_template.json holds {"template": Template.to_dict(), ...}; accept either shape
    return Template.from_dict(template.get("template", template))


def _pieces(text: str) -> list[str]:
    """`text` cut between the two characters of every delimiter pair ("{{" -> "{", "{")."""
    out, start = [], 0
    for i in range(1, len(text)):
        if text[i - 1 : i + 1] in _DELIMITERS:
            out.append(text[start:i])
            start = i
    return [*out, text[start:]] if text else []


def _jinja_literal(text: str) -> str:
    """Template code printing `text` verbatim; only \\n \\r \\t \\\\ \\' escapes (minja and Jinja2 agree)."""
    return "".join(
        "{{- '" + "".join(_JINJA_ESCAPES.get(c, c) for c in piece) + "' -}}" for piece in _pieces(text)
    )


def _go_literal(text: str) -> str:
    """Template code printing `text` verbatim: a Go string literal whose every character is printable.

    Ollama's Modelfile parser drops non-printable characters and ends a triple-quoted value at `\"\"\"`:
    escaping every quote and every non-printable character keeps both out of the TEMPLATE value."""

    def char(c: str) -> str:
        if c in '"\\':
            return "\\" + c
        if c.isprintable():
            return c
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\U{ord(c):08x}")

    return "".join('{{ "' + "".join(char(c) for c in piece) + '" }}' for piece in _pieces(text))


def _prompt_parts(t: Template) -> list[str | None]:
    """The prompt of one chat turn: literal texts, and None where the user's message goes.

    A chat turn fills the fields as tunesmith's server does (`generate._turn_fields`): the message is the
    `question` (qa) or the `instruction` with an empty `input` (alpaca), so Alpaca's no-input prompt is used.
    """
    if t.format == "text":  # raw-text models continue the user's text as given
        return [None]
    fmt = t.prompt_no_input if t.prompt_no_input is not None else t.prompt
    user = "instruction" if t.format == "alpaca" else "question"
    parts: list[str | None] = []
    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        if literal:
            parts.append(literal)
        if name is None or (t.format == "alpaca" and name == "input" and not spec and not conversion):
            continue  # no field here, or Alpaca's input, which a chat turn leaves empty
        if name != user or spec or conversion:
            raise UserError(
                f"data.template: field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} cannot be filled from a chat message (tunesmith serve "
                f"answers such requests with 400); a GGUF chat template needs a template over {{{user}}} only"
            )
        parts.append(None)
    return parts


def _bos_eos_texts(tokenizer) -> tuple[str, str]:
    """The texts of the special tokens the tokenizer puts before / after a text (add_special_tokens)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    head, tail = full[:at], full[at + len(plain) :]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False) if ids else ""  # noqa: E731
    return decode(head), decode(tail)


def jinja_template(template: dict, tokenizer) -> str:
    """The Jinja chat template that renders a request as tunesmith does for this trained template."""
    t = _as_template(template)
    if t.kind == "chat":
        if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
            raise UserError(
                "data.template=chat but the tokenizer has no chat_template to embed in the GGUF "
                "(give the model's tokenizer a chat_template, or train with a string data.template)"
            )
        return tokenizer.chat_template
    head, tail = _bos_eos_texts(tokenizer)
    bos = "{{- bos_token -}}" if head and head == tokenizer.bos_token else _jinja_literal(head)

    def prompt(user: str) -> str:
        return "".join(f"{{{{- {user} -}}}}" if p is None else _jinja_literal(p) for p in _prompt_parts(t))

    # The system content is read though never rendered: llama-server (--jinja) probes whether a template reads
    # messages[0].content of a system turn and, when it does not, merges the system text into the next user
    # turn (common/chat.cpp, system_message_not_supported), which tunesmith never does.
    # Every tag trims the whitespace around it, so the layout below renders the same with or without the
    # trim_blocks/lstrip_blocks options llama.cpp and transformers set.
    shots = (
        ""
        if t.format == "text"
        else (
            "{%- for m in messages -%}\n"
            "  {%- if m['role'] == 'user' -%}{%- set ns.prev = true -%}{%- set ns.user = m['content'] -%}\n"
            "  {%- elif m['role'] == 'assistant' -%}\n"
            "    {%- if ns.prev and loop.index0 < ns.last -%}\n"
            f"      {prompt('ns.user')}{{{{- m['content'] -}}}}{_jinja_literal(SHOT_SEPARATOR)}\n"
            "    {%- endif -%}{%- set ns.prev = false -%}\n"
            "  {%- elif m['role'] != 'system' -%}{%- set ns.prev = false -%}\n"
            "  {%- endif -%}\n"
            "{%- endfor -%}\n"
        )
    )
    return (
        "{#- tunesmith: system messages are read but left out, as tunesmith serve leaves them out -#}\n"
        "{%- set ns = namespace(last=-1, prev=false, user='', question='', system='') -%}\n"
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}"
        "{%- set ns.question = m['content'] -%}{%- elif m['role'] == 'system' -%}"
        "{%- set ns.system = m['content'] -%}{%- endif -%}{%- endfor -%}\n"
        f"{bos}\n{shots}{prompt('ns.question')}{_jinja_literal(tail)}\n"
    )


def stop_strings(template: dict, tokenizer) -> list[str]:
    """What ends an answer: the EOS text (tunesmith stops at EOS; string templates add no stop string)."""
    if tokenizer.eos_token is None:
        raise UserError("tokenizer has no eos_token: set one on the model's tokenizer so answers can end")
    return [tokenizer.eos_token]


def _go_string_template(t: Template) -> str:
    """The Ollama TEMPLATE for a string template: the Jinja program above in Go's text/template."""

    def prompt(user: str) -> str:
        return "".join(f"{{{{ {user} }}}}" if p is None else _go_literal(p) for p in _prompt_parts(t))

    shots = (
        ""
        if t.format == "text"
        else (
            '{{- $user := "" }}{{ $prev := false }}\n'
            "{{- range $i, $m := .Messages }}\n"
            '  {{- if eq $m.Role "user" }}{{ $user = $m.Content }}{{ $prev = true }}\n'
            '  {{- else if eq $m.Role "assistant" }}\n'
            "    {{- if and $prev (lt $i $last) }}"
            f"{prompt('$user')}{{{{ $m.Content }}}}{_go_literal(SHOT_SEPARATOR)}{{{{ end }}}}\n"
            "    {{- $prev = false }}\n"
            '  {{- else if ne $m.Role "system" }}{{ $prev = false }}\n'
            "  {{- end }}\n"
            "{{- end }}\n"
        )
    )
    return (
        '{{- $last := -1 }}{{ $question := "" }}\n'
        '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $last = $i }}'
        "{{ $question = $m.Content }}{{ end }}{{ end }}\n"
        f'{shots}{{{{- "" }}}}{prompt("$question")}'
    )


def _modelfile_value(value: str, where: str) -> str:
    """A Modelfile argument quoted so Ollama's parser reads back `value` exactly (it has no escapes)."""
    if '"""' in value or not all(c.isprintable() or c in "\n\t" for c in value):
        raise UserError(
            f'{where}: {value!r} cannot be written in an Ollama Modelfile (it holds """ or a '
            "non-printable character); change it"
        )
    return f'"""{value}"""' if '"' in value else f'"{value}"'


def _chat_blocks(tokenizer) -> dict[str, str] | None:
    """The texts a chat template puts before each turn, keyed "<previous role>_<role>" ("first_user",
    "user_assistant", ...; "user_end" ends with the generation prompt), found by rendering probe
    conversations; None when the template is not that simple (verified on more conversations)."""
    from jinja2 import TemplateError

    marks = {"system": "Tsm0Sys", "user": "Tsm1Usr", "assistant": "Tsm2Ast", "user2": "Tsm3Usr"}

    def gaps_of(roles: list[str]) -> list[str] | None:
        msgs = [{"role": r.rstrip("2"), "content": marks[r]} for r in roles]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return _split_at(text, [marks[r] for r in roles])

    try:
        gaps, rest = (
            gaps_of(["system", "user", "assistant", "user2"]),
            gaps_of(["user", "assistant", "user2"]),
        )
    except TemplateError:  # e.g. a template that refuses a system turn
        return None
    if gaps is None or rest is None or rest[1:] != gaps[2:]:
        return None
    keys = ("first_system", "system_user", "user_assistant", "assistant_user", "user_end")
    blocks = dict(zip(keys, gaps)) | {"first_user": rest[0]}
    bos = _bos_eos_texts(tokenizer)[0]  # the BOS the tokenizer adds, which Ollama adds itself when tokenizing
    for key in ("first_system", "first_user"):
        if bos and blocks[key].startswith(bos):
            blocks[key] = blocks[key][len(bos) :]
    checks = [
        ["user"],
        ["system", "user"],
        ["user", "assistant"] * 2 + ["user"],
        ["system"] + ["user", "assistant"] * 2 + ["user"],
    ]
    for roles in checks:
        msgs = [{"role": r, "content": f"check {i} {{%'\"\n"} for i, r in enumerate(roles)]
        expected = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if bos and expected.startswith(bos):
            expected = expected[len(bos) :]
        if render_blocks(blocks, msgs) != expected:
            return None
    return blocks


def _split_at(text: str, marks: list[str]) -> list[str] | None:
    """The texts around and between the marks, in order; None unless each mark occurs once."""
    out, start = [], 0
    for mark in marks:
        at = text.find(mark, start)
        if at < 0 or text.count(mark) != 1:
            return None
        out.append(text[start:at])
        start = at + len(mark)
    return [*out, text[start:]]


def render_blocks(blocks: dict[str, str], messages: list[dict[str, str]]) -> str:
    """A conversation rendered from `_chat_blocks` texts (what the Ollama TEMPLATE for a chat model does)."""
    out, prev = "", "first"
    for m in messages:
        out += blocks.get(f"{prev}_{m['role']}", "") + m["content"]
        prev = m["role"]
    return out + blocks.get(f"{prev}_end", "")


def _go_chat_template(blocks: dict[str, str]) -> str:
    """The Ollama TEMPLATE for a chat model: each turn's leading text chosen by the previous role."""
    branches = []
    for key, text in blocks.items():
        if key.endswith("_end"):
            continue
        prev, role = key.split("_")
        branches.append(f'and (eq $prev "{prev}") (eq $m.Role "{role}") }}}}{_go_literal(text)}')
    chain = "{{- if " + "{{ else if ".join(branches) + "{{ end }}"
    return (
        '{{- $prev := "first" }}\n'
        "{{- range $i, $m := .Messages }}\n"
        f"  {chain}{{{{ $m.Content }}}}{{{{ $prev = $m.Role }}}}\n"
        "{{- end }}\n"
        f'{{{{- if eq $prev "user" }}}}{_go_literal(blocks["user_end"])}{{{{ end }}}}'
    )


def ollama_modelfile(gguf_name: str, template: dict, tokenizer, gen: GenerateConfig) -> str:
    """An Ollama Modelfile: the GGUF, its prompt template in Go's text/template, stops, generation defaults.

    No SYSTEM line: tunesmith's config has no default system prompt, and string templates drop system turns.
    """
    t = _as_template(template)
    lines = [
        "# Written by `tunesmith export --gguf`. Use: ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    if t.kind == "chat":
        jinja_template(template, tokenizer)  # the same error when there is no chat template
        blocks = _chat_blocks(tokenizer)
        go = None if blocks is None else _go_chat_template(blocks)
    else:
        go = _go_string_template(t)
    if go is None:
        lines.append("# no TEMPLATE: the chat template is not one text per turn; Ollama reads the GGUF's own")
    else:
        assert '"""' not in go  # every quote in a literal is escaped (_go_literal)
        lines.append(f'TEMPLATE """{go}"""')
    stops = list(dict.fromkeys(s for s in [*stop_strings(template, tokenizer), *gen.stop] if s))
    lines += [f"PARAMETER stop {_modelfile_value(s, 'generate.stop')}" for s in stops]
    lines += [
        f"PARAMETER temperature {gen.temperature}",
        f"PARAMETER top_p {gen.top_p}",
        f"PARAMETER top_k {gen.top_k}",  # 0 switches top-k off in tunesmith and in llama.cpp alike
        f"PARAMETER num_predict {gen.max_new_tokens}",
        f"PARAMETER repeat_penalty {gen.repetition_penalty}",
        f"PARAMETER seed {gen.seed}",
    ]
    if gen.repetition_penalty != 1.0:
        # transformers penalises every earlier token, llama.cpp the last repeat_last_n (-1: the whole context)
        lines.append("PARAMETER repeat_last_n -1")
    return "\n".join(lines) + "\n"


def export_readme(out_dir: Path, files: list[str], model_name: str) -> str:
    """README.md for an export dir: what each file is, and the commands that run the first GGUF listed."""
    ggufs = [f for f in files if f.endswith(".gguf")]
    if not ggufs:
        raise ValueError("export_readme: no .gguf file given")
    first = ggufs[0]
    about = {
        "Modelfile": "Ollama recipe: prompt template, stop strings, generation defaults of the config",
        "README.md": "this file",
    }
    listing = "\n".join(
        f"- `{f}`: " + (f"GGUF, {_quant_of(f)}" if f.endswith(".gguf") else about.get(f, "")) for f in files
    )
    return f"""# {model_name} (GGUF)

Exported by `tunesmith export --gguf` into `{out_dir}`:

{listing}

Each GGUF carries the chat template the model was trained with: chat clients render prompts as training did.

## Ollama

```
cd {out_dir}
ollama create {model_name} -f Modelfile
ollama run {model_name}
```

## llama.cpp

Chat in the terminal (the chat template is embedded in the GGUF; `--jinja` runs it as is, the default in
recent llama.cpp):

```
llama-cli -m {out_dir / first} -cnv --jinja
```

OpenAI-compatible server, then `http://127.0.0.1:8080/v1/chat/completions`:

```
llama-server -m {out_dir / first} --jinja
```

## tunesmith

Serve it behind tunesmith's OpenAI API and playground, with llama.cpp doing the generation:

```
tunesmith serve model.name={out_dir / first} serve.engine=llama.cpp
```
"""


def _quant_of(name: str) -> str:
    """The quantisation named in a GGUF file name (`model-q4_k_m.gguf` -> q4_k_m)."""
    stem = Path(name).stem.lower()
    known = (
        "f32",
        "bf16",
        "f16",
        "q8_0",
        "q6_k",
        "q5_k_m",
        "q5_k_s",
        "q5_0",
        "q4_k_m",
        "q4_k_s",
        "q4_0",
        "q3_k_m",
        "q2_k",
    )
    return next((q for q in known if stem.endswith(q)), "quantisation not in its name")
