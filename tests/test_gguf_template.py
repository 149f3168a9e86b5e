"""The prompt format a GGUF export carries renders a request exactly as tunesmith does.

Jinja: rendered by llama-cpp-python's own Jinja2ChatFormatter (and plain jinja2 set up the same way, so the
check runs where llama-cpp-python is not installed), the text must equal tunesmith's prompt ids decoded, and
tokenizing that text must give those ids back. BOS: tunesmith's ids start with BOS when the tokenizer
adds one; the template renders `bos_token` there, and llama.cpp does not add a second one (llama-cpp-python
marks a Jinja prompt as holding its specials; llama-server strips a rendered leading BOS before adding its
own, per the GGUF's add_bos_token), so the text is tokenized here without special tokens added.

Ollama: there is no Go runtime here, so the Modelfile is parsed by the rules of Ollama's parser and its
TEMPLATE is executed by `go_render` below, a renderer of exactly the text/template subset gguf_template emits
(variables, range over .Messages, if/else if, eq/ne/lt/and, string and int literals, `{{-`/`-}}` trimming). It
is a model of Go's semantics for that subset, not Go itself. Ollama merges consecutive turns of one role
before templating (its `collate`), so the conversations compared never have two in a row.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from tunesmith.config import GenerateConfig, UserError
from tunesmith.data.formats import get_template
from tunesmith.generate import conversation_ids
from tunesmith.model.gguf_template import (
    export_readme,
    jinja_template,
    ollama_modelfile,
    render_blocks,
    stop_strings,
)

SYSTEM = {"role": "system", "content": "Answer in one word."}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [SYSTEM, {"role": "user", "content": "What is {x} %} 2+2 'quoted' \\ ?"}],
    [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And 3*3?\n"},
    ],
    [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "«3+3» ?"},
    ],
]
# String templates only (a chat template renders a trailing assistant turn, tunesmith drops it):
EDGES = [
    [  # a trailing answer is ignored
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ],
    [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],  # an answer to nothing
    [  # a system turn between a question and its answer does not part them
        {"role": "user", "content": "a"},
        SYSTEM,
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]
# Jinja only: Ollama merges consecutive turns of one role before templating
JINJA_EDGES = [
    [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ],
    [],
]
# (data.template, data.format): the built-ins and user format strings with braces, quotes, backslashes
TEMPLATES = [
    ("qa", "qa"),
    ("alpaca", "alpaca"),  # Alpaca's two prompts: a chat turn has no input, so the no-input one
    ("### Task:\n{instruction}\n{input}\n### Output:\n", "alpaca"),  # one prompt: {input} is empty
    ("{{%raw%}} 'Q' \\ \"{question}\" {{{{x}}}} #}} A:", "qa"),
    ("text", "text"),
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from tunesmith.model.resolve import resolve

    # the machine-wide conversion cache of the packaged SmolLM2 (converted once, then ~1 s)
    return AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def smollm2_bos():
    """SmolLM2's tokenizer made to add a BOS (<|im_start|>, id 1) like Llama's: the BOS path."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from tunesmith.model.resolve import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    assert tok("hi")["input_ids"][0] == 1 and tok("hi", add_special_tokens=False)["input_ids"][0] != 1
    return tok


def _render_llama_cpp(template: str, tok, messages: list[dict]) -> str:
    llama_chat_format = pytest.importorskip(
        "llama_cpp.llama_chat_format", reason="llama-cpp-python is not installed (make installs it)"
    )
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=tok.eos_token, bos_token=tok.bos_token, add_generation_prompt=True
    )
    return formatter(messages=messages).prompt


def _render_jinja2(template: str, tok, messages: list[dict]) -> str:
    # set up as llama-cpp-python's Jinja2ChatFormatter is (sandbox, trim/lstrip blocks, its helpers)
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    return env.from_string(template).render(
        messages=messages,
        eos_token=tok.eos_token,
        bos_token=tok.bos_token,
        add_generation_prompt=True,
        raise_exception=raise_exception,
        strftime_now=lambda f: datetime.now().strftime(f),
    )


RENDERERS = {"llama_cpp": _render_llama_cpp, "jinja2": _render_jinja2}


def _assert_parity(render, template, tok, messages: list[dict]) -> str:
    ids = conversation_ids(template, tok, messages)
    text = render(jinja_template(template.to_dict(), tok), tok, messages)
    assert text == tok.decode(ids, skip_special_tokens=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    return text


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize(("name", "fmt"), TEMPLATES)
def test_string_template_renders_requests_as_tunesmith(renderer, name, fmt, smollm2, smollm2_bos):
    template = get_template(name, fmt)
    for tok in (smollm2, smollm2_bos):
        for messages in CONVERSATIONS + EDGES + JINJA_EDGES:
            text = _assert_parity(RENDERERS[renderer], template, tok, messages)
            assert (
                SYSTEM["content"] not in text
            )  # tunesmith serve leaves system turns out of string templates
            # exactly one BOS where the tokenizer adds one, none where it does not
            assert text.count("<|im_start|>") == (tok is smollm2_bos)
    if name == "qa":  # by hand: the earlier exchange as a whole example and a blank line, then the question
        text = _render_jinja2(jinja_template(template.to_dict(), smollm2), smollm2, CONVERSATIONS[2])
        assert (
            text == "### Question:\nHi\n\n### Answer:\nHello!\n\n### Question:\nAnd 3*3?\n\n\n### Answer:\n"
        )
    if name == "alpaca":
        text = _render_jinja2(jinja_template(template.to_dict(), smollm2), smollm2, CONVERSATIONS[0])
        assert "### Instruction:\nWhat is the capital of France?\n\n### Response:\n" in text
        assert "### Input:" not in text


@pytest.mark.parametrize("renderer", RENDERERS)
def test_chat_template_is_the_tokenizers_own_system_prompt_included(renderer, smollm2):
    template = get_template("chat", "qa")
    assert jinja_template(template.to_dict(), smollm2) == smollm2.chat_template
    for messages in CONVERSATIONS:
        text = _assert_parity(RENDERERS[renderer], template, smollm2, messages)
        # SmolLM2's template puts its default system prompt first when a request has none
        default = "You are a helpful AI assistant named SmolLM" in text
        assert (SYSTEM["content"] in text) == (messages[0] is SYSTEM) == (not default)


class _Read(dict):
    """A message that records which of its keys a template read."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize(("name", "fmt"), TEMPLATES)
def test_string_template_reads_the_system_turn_it_leaves_out(name, fmt, smollm2):
    # llama-server probes [system, user] and merges the system text into the user turn when the template
    # never reads messages[0].content (common/chat.cpp: system_message_not_supported); tunesmith drops it
    system, user = _Read(SYSTEM), _Read({"role": "user", "content": "Hi"})
    text = _render_jinja2(jinja_template(get_template(name, fmt).to_dict(), smollm2), smollm2, [system, user])
    assert "content" in system.read and SYSTEM["content"] not in text and "Hi" in text


def test_what_cannot_be_rendered_is_refused(smollm2):
    # a field a chat message cannot fill: tunesmith serve answers 400, export refuses with the field named
    with pytest.raises(UserError, match=r"\{context\}"):
        jinja_template(get_template("{context}\n{question}", "qa").to_dict(), smollm2)
    no_chat = type("NoChat", (), {"chat_template": None})()
    with pytest.raises(UserError, match="no chat_template"):
        jinja_template(get_template("chat", "qa").to_dict(), no_chat)


def test_stop_strings_are_eos(smollm2):
    # tunesmith stops at EOS for every template (and at generate.stop, which the Modelfile adds)
    for name, fmt in TEMPLATES + [("chat", "qa")]:
        assert stop_strings(get_template(name, fmt).to_dict(), smollm2) == ["<|im_end|>"]


# ---- Ollama: the Modelfile parsed as Ollama's parser reads it, its TEMPLATE run by a Go-subset renderer ----


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs read by the rules of Ollama's parser/parser.go (no escapes, no raw "\"\"\"")."""
    # Ollama drops non-printable characters; a value ends at the first line end where it unquotes
    assert all(c.isprintable() or c in "\n\t" for c in text)
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] in " \t\n":
            i += 1
            continue
        if text[i] == "#":
            i = (text.find("\n", i) + 1) or n
            continue
        j = i
        while text[j].isalpha():
            j += 1
        name = text[i:j].upper()
        if name == "PARAMETER":
            i = j = j + 1
            while text[j].isalnum() or text[j] == "_":
                j += 1
            name += " " + text[i:j]
        assert text[j] == " ", f"{name}: a space must follow the command"
        i = j = j + 1
        while True:
            if j == n or text[j] == "\n":
                value = _unquote(text[i:j].strip())
                if value is not None:
                    break
                assert j < n, f"{name}: value never ends"
            j += 1
        out.append((name, value))
        i = j
    return out


def _unquote(s: str) -> str | None:
    for quote in ('"""', '"'):
        if s.startswith(quote):
            ok = len(s) >= 2 * len(quote) and s.endswith(quote)
            return s[len(quote) : -len(quote)] if ok else None
    return s


def _go_tokens(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) with {{- / -}} trimming applied."""
    out, i = [], 0
    while (at := template.find("{{", i)) >= 0:
        out.append(("text", template[i:at]))
        j, quoted = at + 2, False
        while quoted or template[j : j + 2] != "}}":  # skip "}}" inside a string literal
            quoted = (not quoted) if template[j] == '"' else quoted
            j += 2 if quoted and template[j] == "\\" else 1
        action = template[at + 2 : j]
        if action.startswith("- "):
            out[-1] = ("text", out[-1][1].rstrip(" \t\r\n"))
        out.append(("action", action.removeprefix("- ").removesuffix(" -").strip()))
        if action.endswith(" -"):
            out.append(("trim", ""))
        i = j + 2
    out.append(("text", template[i:]))
    trimmed, trim = [], False
    for kind, s in out:
        if kind == "trim":
            trim = True
            continue
        trimmed.append((kind, s.lstrip(" \t\r\n") if trim and kind == "text" else s))
        trim = False
    return trimmed


def _go_words(expr: str) -> list[str]:
    words, i = [], 0
    while i < len(expr):
        if expr[i] == " ":
            i += 1
        elif expr[i] == '"':
            j = i + 1
            while expr[j] != '"':
                j += 2 if expr[j] == "\\" else 1
            words.append(expr[i : j + 1])
            i = j + 1
        elif expr[i] in "()":
            words.append(expr[i])
            i += 1
        else:
            j = i
            while j < len(expr) and expr[j] not in ' ()"':
                j += 1
            words.append(expr[i:j])
            i = j
    return words


def _go_eval(words: list[str], scope: dict):
    """One pipeline: a function call (eq ne lt and) or a single operand."""

    def operand(k: int):
        w = words[k]
        if w == "(":
            depth, end = 1, k + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(words[end], 0)
                end += 1
            return _go_eval(words[k + 1 : end - 1], scope), end
        if w.startswith('"'):
            return w[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape"), k + 1
        if w in ("true", "false"):
            return w == "true", k + 1
        if w.lstrip("-").isdigit():
            return int(w), k + 1
        if w.startswith("$"):
            var, _, field = w.partition(".")
            value = scope[var]
            return (value[field.lower()] if field else value), k + 1
        if w == ".Messages":
            return scope["."]["Messages"], k + 1
        raise AssertionError(f"not in the Go subset this renderer knows: {w}")

    functions = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "lt": lambda a, b: a < b,
        "and": lambda *xs: next((x for x in xs if not x), xs[-1]),
    }
    if words[0] in functions:
        args, k = [], 1
        while k < len(words):
            value, k = operand(k)
            args.append(value)
        return functions[words[0]](*args)
    value, k = operand(0)
    assert k == len(words), words
    return value


def go_render(template: str, messages: list[dict]) -> str:
    """Execute the subset of Go's text/template that gguf_template emits, on Ollama's .Messages."""
    tokens = _go_tokens(template)
    scope: dict = {".": {"Messages": messages}}

    def block(k: int, out: list[str], run: bool) -> tuple[int, str]:
        """Run tokens from k until an end/else at this depth; returns (index, the tag that stopped it)."""
        while k < len(tokens):
            kind, s = tokens[k]
            if kind == "text":
                out.append(s if run else "")
                k += 1
                continue
            words = _go_words(s)
            if words[0] in ("end", "else"):
                return k, s
            if words[0] == "if":
                k, taken = _go_if(k, out, run, words[1:])
            elif words[0] == "range":
                assert words[1:5] == ["$i,", "$m", ":=", ".Messages"], s
                end = block(k + 1, [], False)[0]
                for i, m in enumerate(messages if run else []):
                    scope["$i"], scope["$m"] = i, m
                    block(k + 1, out, True)
                k = end + 1
            elif len(words) > 2 and words[1] in (":=", "="):
                if run:
                    assert (words[0] in scope) == (words[1] == "="), f"{s}: declared once, assigned after"
                    scope[words[0]] = _go_eval(words[2:], scope)
                k += 1
            else:
                out.append(str(_go_eval(words, scope)) if run else "")
                k += 1
        return k, ""

    def _go_if(k: int, out: list[str], run: bool, cond: list[str]) -> tuple[int, bool]:
        taken = run and bool(_go_eval(cond, scope))
        k, tag = block(k + 1, out, taken)
        done = taken
        while tag.startswith("else"):
            rest = _go_words(tag)[1:]
            if rest and rest[0] == "if":
                branch = run and not done and bool(_go_eval(rest[1:], scope))
            else:
                branch = run and not done
            k, tag = block(k + 1, out, branch)
            done = done or branch
        assert tag == "end"
        return k + 1, done

    out: list[str] = []
    k, tag = block(0, out, True)
    assert k == len(tokens) and tag == "", "unbalanced template"
    return "".join(out)


def test_go_renderer_follows_go_semantics_on_known_cases():
    # hand-computed cases of the subset: trimming, else-if chains, variables assigned inside range
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    t = (
        '{{- $n := 0 }} x {{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}U'
        "{{ else if lt $i 5 }}A{{ end }}{{ $n = $i }}{{ end }} {{ $n }}"
    )
    assert go_render(t, msgs) == " xUA 1"
    assert go_render('{{ "q\\"\\n}" }}|{{- " x" -}} |', []) == 'q"\n}| x|'
    assert go_render("{{ range $i, $m := .Messages }}never{{ end }}done", []) == "done"


@pytest.mark.parametrize(("name", "fmt"), [*TEMPLATES, ("chat", "qa")])
def test_ollama_modelfile_template_renders_as_tunesmith(name, fmt, smollm2, smollm2_bos):
    template = get_template(name, fmt)
    gen = GenerateConfig(temperature=0.7, top_k=40, max_new_tokens=99, stop=["\n\n###", 'say "x"'])
    for tok in (smollm2, smollm2_bos):
        text = ollama_modelfile("model-q8_0.gguf", template.to_dict(), tok, gen)
        commands = parse_modelfile(text)
        values = dict(commands)
        assert commands[0] == ("FROM", "./model-q8_0.gguf")
        stops = [v for k, v in commands if k == "PARAMETER stop"]
        assert stops == ["<|im_end|>", "\n\n###", 'say "x"']
        assert values["PARAMETER temperature"] == "0.7" and values["PARAMETER top_k"] == "40"
        assert values["PARAMETER num_predict"] == "99" and values["PARAMETER repeat_penalty"] == "1.0"
        assert "SYSTEM" not in values  # no default system prompt in tunesmith's config
        for messages in CONVERSATIONS + (EDGES if template.kind == "string" else []):
            ids = conversation_ids(template, tok, messages)
            # Ollama adds BOS itself when the GGUF says add_bos_token: the TEMPLATE renders none
            want = tok.decode(ids[1:] if tok is smollm2_bos else ids, skip_special_tokens=False)
            assert go_render(values["TEMPLATE"], messages) == want


def test_chat_blocks_model_matches_the_template(smollm2):
    # the per-turn texts found for SmolLM2's ChatML template, by hand
    go = dict(
        parse_modelfile(
            ollama_modelfile("m.gguf", {"format": "qa", "kind": "chat"}, smollm2, GenerateConfig())
        )
    )
    assert '"<|im_end|>\\n<|im_start|>assistant\\n"' in go["TEMPLATE"]
    blocks = {
        "first_user": "<u>",
        "user_assistant": "</u><a>",
        "assistant_user": "</a><u>",
        "user_end": "</u><a>",
    }
    msgs = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "3"},
    ]
    assert render_blocks(blocks, msgs) == "<u>1</u><a>2</a><u>3</u><a>"


def test_chat_template_beyond_one_text_per_turn_gets_no_ollama_template():
    from tests import tiny

    tok = tiny.tokenizer()  # its ChatML-like template: one text per turn, rendered in Go
    chat = {"format": "qa", "kind": "chat"}
    go = dict(parse_modelfile(ollama_modelfile("m.gguf", chat, tok, GenerateConfig())))["TEMPLATE"]
    for messages in CONVERSATIONS:
        assert go_render(go, messages) == tok.decode(
            conversation_ids(get_template("chat", "qa"), tok, messages)
        )
    # a template that trims what the user wrote is not: no TEMPLATE (Ollama then uses the GGUF's own)
    tok.chat_template = tiny.CHAT_TEMPLATE.replace("m['content']", "m['content'] | trim")
    commands = parse_modelfile(ollama_modelfile("m.gguf", chat, tok, GenerateConfig()))
    assert "TEMPLATE" not in dict(commands) and commands[0] == ("FROM", "./m.gguf")


def test_modelfile_refuses_a_stop_it_cannot_quote(smollm2):
    with pytest.raises(UserError, match="generate.stop"):
        ollama_modelfile(
            "m.gguf",
            {"format": "qa", "kind": "string", "prompt": "{question}"},
            smollm2,
            GenerateConfig(stop=['a"""b']),
        )


def test_export_readme_names_files_and_commands(tmp_path):
    readme = export_readme(tmp_path, ["m-f16.gguf", "m-q4_k_m.gguf", "Modelfile"], "mymodel")
    assert "`m-f16.gguf`: GGUF, f16" in readme and "`m-q4_k_m.gguf`: GGUF, q4_k_m" in readme
    assert readme.count("`Modelfile`: Ollama recipe") == 1
    for command in (
        "ollama create mymodel -f Modelfile",
        "ollama run mymodel",
        f"llama-cli -m {tmp_path / 'm-f16.gguf'} -cnv --jinja",
        f"llama-server -m {tmp_path / 'm-f16.gguf'} --jinja",
        "http://127.0.0.1:8080/v1/chat/completions",
        "serve.engine=llama.cpp",
    ):
        assert command in readme
