"""YAML + dotted overrides -> a validated Config, and every config error as one line with a suggestion."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import UserError
from .schema import Config


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the schema, for 'did you mean' suggestions."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _section_type(field.annotation)
        if sub is not None:
            keys += _known_keys(sub, prefix + name + ".")
    return keys


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model inside `X` or `X | None`, else None."""
    for t in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


# Names other trainers use for our fields (HF Trainer, axolotl, litgpt...): last segment -> our name.
_ALIASES = {
    "learning_rate": "lr",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "seq_len": "max_length",
    "cutoff_len": "max_length",
    "block_size": "max_length",
    "num_steps": "max_steps",
    "total_steps": "max_steps",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "logging_steps": "log_every",
    "lr_scheduler_type": "scheduler",
    "torch_dtype": "dtype",
    "output_dir": "out_dir",
    "model_name_or_path": "name",
    "dataset": "path",
    "train_file": "path",
    "val_size": "test_size",
    "eval_size": "test_size",
    "validation_split": "test_size",
    "max_tokens": "max_new_tokens",
}


def _item_fields(section: str, prefix: str) -> dict[str, str]:
    """{field: prefix + field} of the model a list or dict section holds (data.sources, eval.endpoints)."""
    node: Any = Config
    for name in section.split("."):
        field = node.model_fields.get(name) if node is not None else None
        ann = field.annotation if field is not None else None
        node = next(
            (
                t
                for a in (ann, *getattr(ann, "__args__", ()))
                for t in (a, *getattr(a, "__args__", ()))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
    return {n: prefix + n for n in node.model_fields} if node is not None else {}


def suggest_key(key: str) -> str | None:
    """The closest known key: the same section first, compared on the last segment, aliases included."""
    key = ".".join(p.split("[", 1)[0] for p in key.split("."))  # data.sources[0].x: every item has one schema
    section, _, last = key.rpartition(".")
    prefix = section + "." if section else ""
    known = _known_keys(Config)
    siblings = {k[len(prefix) :]: k for k in known if k.startswith(prefix) and "." not in k[len(prefix) :]}
    if not siblings and section:  # a section inside a list (data.sources): the fields of its item model
        siblings = _item_fields(section, prefix)
    if not siblings and "." in section:  # a named entry of a dict section (eval.endpoints.NAME): its fields
        siblings = _item_fields(section.rpartition(".")[0], prefix)
    # an alias counts as a sibling name pointing at its target, so a typo of an alias finds the target too
    names = dict(siblings) | {a: siblings[t] for a, t in _ALIASES.items() if t in siblings}
    guess = difflib.get_close_matches(last, list(names), n=1, cutoff=0.6)
    if guess:
        return names[guess[0]]
    if siblings:  # a known section: nothing close there means nothing close at all
        return None
    guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)  # a misspelt section: search every key
    return guess[0] if guess else None


def _format_error(err: dict, source: str, raw: dict) -> str:
    # Walk the error's location through the raw input: pydantic adds union members ('str', 'list[str]') and
    # list positions to it, which are no part of the key the user wrote.
    parts, value, found = [], raw, True
    for i, p in enumerate(err["loc"]):
        if isinstance(p, int) and isinstance(value, (list, tuple)):
            parts.append(f"[{p}]")
            found = -len(value) <= p < len(value)
            value = value[p] if found else None
        elif isinstance(value, dict) and p in value:
            parts.append(f".{p}")
            value = value[p]
        elif err["type"] in ("missing", "extra_forbidden") and i == len(err["loc"]) - 1:
            parts.append(f".{p}")  # the field the user left out (or added): not in the input's values
            found = False
        # else: a union member's name, not a key
    key = "".join(parts).lstrip(".")

    def shown(s: str) -> str:  # user text inside a one-line message: line breaks written as escapes
        return s if s.isprintable() else repr(s)[1:-1]

    if err["type"] == "extra_forbidden":
        guess = suggest_key(key)
        hint = f" — did you mean '{guess}'?" if guess else " (see `tunesmith config show`)"
        return f"{source}: unknown key '{shown(key)}'{hint}"
    msg = shown(err["msg"].replace("Value error, ", ""))
    got = repr(value)
    # a whole-config rule (no key) names its fields itself: echoing the whole config would bury it
    got = f" (got {got[:200]}{'…' if len(got) > 200 else ''})" if found and key else ""
    return f"{shown(source)}: {shown(key)}: {msg}{got}" if key else f"{shown(source)}: {msg}{got}"


def parse_overrides(overrides: list[str]) -> dict:
    """['train.lr=1e-4', 'data.fields={a: b}'] -> nested dict; values parse as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        shown = item if item.isprintable() else repr(item)[1:-1]  # one-line messages, whatever was typed
        shown = shown if len(shown) <= 200 else shown[:200] + "…"
        if "=" not in item:
            raise UserError(f"override '{shown}' must look like key=value (e.g. train.lr=1e-4)")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        # PyYAML's constructors raise ValueError for impossible dates/numbers (`2024-01-01 25:00:00`,
        # `!!int 0x`), and its composer recurses per nesting level
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise UserError(f"override '{shown}': value is not valid YAML ({e.__class__.__name__})") from None
        node = tree
        parts = [p.strip() for p in key.split(".")]
        if not all(parts):
            raise UserError(f"override '{shown}': empty key part (keys look like train.lr)")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{shown}': '{p}' is not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing) plus dotted overrides into a validated Config; UserError on any problem."""
    raw: dict = {}
    source = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        data = p.read_bytes()
        try:
            raw = yaml.safe_load(data.decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise UserError(
                f"{p}:{line}: invalid UTF-8 (byte {data[e.start]:#04x}; re-save the file as UTF-8)"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]  # a ReaderError has no `problem`
            raise UserError(f"{p}{where}: invalid YAML ({problem})") from None
        except (ValueError, RecursionError) as e:  # impossible dates/numbers; nesting deeper than the stack
            raise UserError(
                f"{p}: invalid YAML ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: top level must be a mapping of sections (model, data, train, ...)")
    raw = _merge(raw, parse_overrides(overrides or []))
    if raw.get("lora") is True:  # `lora=true` as an override means "LoRA with defaults"
        raw["lora"] = {}
    elif raw.get("lora") is False:  # and `lora: false` means no LoRA, as `lora: null` does
        raw["lora"] = None
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_error(e.errors()[0], source, raw)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable by load_config)."""
    data = cfg.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def describe(model: BaseModel, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Flatten a config into (dotted key, value, description) rows for `config show`."""
    rows = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            rows += describe(value, prefix + name + ".")
        else:
            rows.append((prefix + name, value, field.description or ""))
    return rows
