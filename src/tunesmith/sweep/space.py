"""What a sweep varies: `--grid KEY=V1,V2,...` values and `--search KEY=log:LOW:HIGH` ranges, as dimensions.

Every `KEY=VALUE` after the config is either a swept dimension or an ordinary override applied to every trial;
the value's form decides, so the two can be mixed in any order:

    grid   KEY=V1,V2,...     every value (a comma list; `[...]`/`{...}` YAML stays an override)
    search KEY=log:LOW:HIGH  float, log-uniform        KEY=float:LOW:HIGH  float, uniform
           KEY=int:LOW:HIGH  integer, both ends in     KEY=cat:A,B,...     one of the choices
           KEY=V1,V2,...     (a comma list under --search is a categorical choice)

>>> [d.key for d in split_args(["train.lr=1e-4,3e-4", "lora.r=8,32", "train.max_steps=20"], False)[0]]
['train.lr', 'lora.r']
>>> grid_points(split_args(["a.x=1,2", "b.y=a,b"], False)[0])[1]
{'a.x': 1, 'b.y': 'b'}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import yaml

from tunesmith.config import UserError

RANGE_KINDS = ("log", "float", "int", "cat")

SPEC_HELP = (
    "KEY=V1,V2,... sweeps those values (--grid: every combination); --search also takes "
    "KEY=log:LOW:HIGH (log-uniform float), KEY=float:LOW:HIGH, KEY=int:LOW:HIGH, KEY=cat:A,B,...; "
    "any other KEY=VALUE is an override applied to every trial"
)


@dataclass(frozen=True)
class Dim:
    """One swept config key: `values` (grid list or categorical choices) or a [low, high] range."""

    key: str
    kind: str  # "values" (a comma list), "cat", "log", "float", "int"
    spec: str  # as typed, for messages and the study's record
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def candidates(self) -> list:
        """Values that must each make a valid config: every listed value, or both ends of a range."""
        if self.kind in ("values", "cat"):
            return list(self.values)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """This dimension's value for an Optuna trial (a value it was given before is returned as it was)."""
        if self.kind in ("values", "cat"):
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")


def scalar(text: str) -> Any:
    """'8' -> 8, '1e-4' -> 0.0001 (YAML would keep it a string), 'true' -> True, 'cosine' -> 'cosine'."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, (list, dict)) or value == "":
        raise ValueError(text)
    return value


def override(key: str, value: Any) -> str:
    """`key=value` that load_config reads back as `value` (floats as YAML floats: 1.0e-05, not 1e-05)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).splitlines()[0]
    return f"{key}={text}"


def _bad(spec: str, why: str) -> UserError:
    return UserError(f"sweep: {spec}: {why} (see `tunesmith sweep --help` for the syntax)")


def _values(spec: str, text: str) -> tuple:
    try:
        values = tuple(scalar(v) for v in text.split(","))
    except ValueError:
        raise _bad(spec, "every value of a comma list must be a plain value (no empty item)") from None
    if len(set(map(repr, values))) != len(values):
        raise _bad(spec, "a value is listed twice")
    return values


def _range(spec: str, key: str, kind: str, rest: str) -> Dim:
    parts = rest.split(":")
    if len(parts) != 2:
        raise _bad(spec, f"a range looks like {kind}:LOW:HIGH (e.g. train.lr=log:1e-5:1e-3)")
    try:
        cast = int if kind == "int" else float
        low, high = cast(parts[0]), cast(parts[1])
    except ValueError:
        raise _bad(
            spec, f"LOW and HIGH of {kind}: must be {'integers' if kind == 'int' else 'numbers'}"
        ) from None
    if not low < high:
        raise _bad(spec, f"LOW must be below HIGH (got {low} >= {high})")
    if kind == "log" and low <= 0:
        raise _bad(spec, "a log range needs LOW > 0")
    return Dim(key, kind, spec, low=low, high=high)


def _dim(spec: str, key: str, text: str, search: bool) -> Dim:
    kind, sep, rest = text.partition(":")
    if sep and kind in RANGE_KINDS:
        if not search:
            raise _bad(spec, "--grid takes a comma list of values; ranges are for --search")
        if kind == "cat":
            return Dim(key, "cat", spec, values=_values(spec, rest))
        return _range(spec, key, kind, rest)
    return Dim(key, "values", spec, values=_values(spec, text))


def _is_dim(text: str) -> bool:
    """A swept value: a range (kind:...) or a comma list that is not YAML ([...], {...}, quoted)."""
    if text.partition(":")[0] in RANGE_KINDS and ":" in text:
        return True
    return "," in text and text.strip()[:1] not in ("[", "{", "'", '"')


def split_args(args: list[str], search: bool) -> tuple[list[Dim], list[str]]:
    """Positional KEY=VALUE items -> (swept dimensions, overrides for every trial)."""
    dims: list[Dim] = []
    overrides: list[str] = []
    for item in args:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise _bad(item, "expected KEY=VALUE")
        if _is_dim(text):
            if any(d.key == key.strip() for d in dims):
                raise _bad(item, f"'{key.strip()}' is swept twice")
            dims.append(_dim(item, key.strip(), text, search))
        else:
            overrides.append(item)
    if not dims:
        mode = "--search" if search else "--grid"
        raise UserError(
            f"sweep: {mode} needs at least one swept key, e.g. train.lr=1e-4,3e-4"
            f"{' or train.lr=log:1e-5:1e-3' if search else ''} (see `tunesmith sweep --help`)"
        )
    return dims, overrides


def grid_points(dims: list[Dim]) -> list[dict[str, Any]]:
    """Every combination of the dimensions' values, the first key varying slowest."""
    return [dict(zip([d.key for d in dims], combo)) for combo in itertools.product(*(d.values for d in dims))]
