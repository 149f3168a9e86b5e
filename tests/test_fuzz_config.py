"""Property tests of config loading: any dotted overrides or YAML text give a Config or a one-line UserError.

Each `@example` is an input that once escaped as another exception (a traceback) or as a message of several
lines or naming the wrong key.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tunesmith.config import Config, UserError, load_config, parse_overrides
from tunesmith.config.load import _known_keys

FUZZ = settings(max_examples=60, deadline=None)
KEYS = _known_keys(Config)
# Keys: real ones, near misses, list positions, random dotted text (line breaks included)
KEY = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k[:-1] + "x"),
    st.sampled_from(["data.sources", "lora.target_modules", "train.betas", "data.fields"]),
    st.lists(st.text(max_size=6), min_size=1, max_size=3).map(".".join),
)
# Values: YAML that PyYAML turns into every type, plus text it chokes on in its constructors or its composer
VALUE = st.one_of(
    st.sampled_from(
        [
            "1",
            "-1",
            "0",
            "1e-4",
            "1.0e-4",
            "true",
            "null",
            "~",
            "",
            "[1]",
            "[0.9, 0.99]",
            "{a: b}",
            "{}",
            "[{path: a, weight: 2}]",
            "[{path: a, wieght: 2}]",
            "all-linear",
            ".nan",
            "-.inf",
            "1e400",
            "2024-01-01",
            "2024-01-01 25:00:00",
            "!!int 0x",
            "!!float x",
            "!!binary zz",
            "&a [*a]",
            "!!python/object:os.system",
            "{[1]: 2}",
            "'unclosed",
            "a: b: c",
            "\x00",
            "- a\n- b",
        ]
    ),
    st.sampled_from([2, 50, 600]).map(lambda n: "[" * n),  # 600: deeper than the stack allows
    st.text(max_size=20),
)
OVERRIDE = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEY, VALUE), st.text(max_size=20))


def _one_line(e: UserError) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, msg
    msg.encode("utf-8")  # printable: no lone surrogate on the way to the terminal
    return msg


@settings(FUZZ)
@given(st.lists(OVERRIDE, max_size=4))
@example(["train.lr=2024-01-01 25:00:00"])  # ValueError from PyYAML's timestamp constructor
@example(["train.lr=" + "[" * 600])  # RecursionError from PyYAML's composer
@example(["train.lr\nx=1"])  # a key with a line break: a two-line message
@example(["x\ud800=1"])  # a lone surrogate in a key: an unprintable message
@example(["train..lr=1"])  # an empty key part
def test_overrides_give_a_config_or_one_line_error(overrides):
    try:
        cfg = load_config(None, overrides)
    except UserError as e:
        _one_line(e)
        return
    assert isinstance(cfg, Config)
    tree = parse_overrides(overrides)  # what loaded must parse the same way on its own
    if isinstance(tree.get("out_dir"), str):
        assert cfg.out_dir == tree["out_dir"]


@settings(FUZZ)
@given(
    st.sampled_from(
        [
            "lora.target_modules=5",
            "data.sources=[{path: 1}]",
            "train.betas=[1]",
            "eval.judge={}",
            "data.sources=[{path: a, weight: -1}]",
            "data.fields={a: 1}",
        ]
    )
)
def test_value_errors_name_the_key_the_user_wrote(override):
    # Was 'lora.target_modules.str: ... (got None)' and 'data.sources.path ... (got None)': pydantic's union
    # members and list positions were read as keys, and the value looked up along them.
    try:
        load_config(None, [override])
    except UserError as e:
        msg = _one_line(e)
    key, _, value = override.partition("=")
    assert msg.startswith(f"config: {key}") and ".str" not in msg and "(got None)" not in msg, msg


def test_known_wrong_keys_and_values_read_well():
    def error(*overrides: str) -> str:
        try:
            load_config(None, list(overrides))
        except UserError as e:
            return _one_line(e)
        raise AssertionError("no error")

    assert (
        error("lora.target_modules=5")
        == "config: lora.target_modules: Input should be a valid string (got 5)"
    )
    assert (
        error("data.sources=[{path: 1}]")
        == "config: data.sources[0].path: Input should be a valid string (got 1)"
    )
    assert error("train.betas=[1]") == "config: train.betas[1]: Field required"
    assert (
        error("data.sources=[{path: a, wieght: 2}]")
        == "config: unknown key 'data.sources[0].wieght' — did you mean 'data.sources.weight'?"
    )
    assert (
        error("train.lr=2024-01-01 25:00:00")
        == "override 'train.lr=2024-01-01 25:00:00': value is not valid YAML (ValueError)"
    )
    assert error("train.lr\nx=1") == "config: unknown key 'train.lr\\nx' — did you mean 'train.lr'?"
    assert (
        load_config(None, ["lora=false"]).lora is None
    )  # as `lora: null`; `lora=true` is LoRA with defaults


@settings(FUZZ)
@given(
    st.one_of(
        st.binary(max_size=60), st.builds(lambda k, v: f"{k.replace('.', ': {')}: {v}".encode(), KEY, VALUE)
    )
)
@example(b"data: {path: a\x00b}")  # a ReaderError has no `problem`: its str() is several lines
@example(b"train: {lr: 2024-01-01 25:00:00}")  # ValueError
@example(b"data: {path: caf\xe9}")  # latin-1 in a config file: UnicodeDecodeError
@example(b"a: " + b"[" * 600)  # RecursionError
def test_config_files_give_a_config_or_one_line_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(data)
        try:
            load_config(path, [])
        except UserError as e:
            assert _one_line(e).startswith(str(path))
