"""Imports point down the pipeline (docs/architecture.md's layer table); parsed with ast, nothing imported."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tunesmith"
DOC = ROOT / "docs" / "architecture.md"

# module (first component under tunesmith) -> layer, planned rooms included; same-layer imports are allowed.
# The same map as the layer table in docs/architecture.md (test_layer_table_in_the_docs_is_this_map).
LAYER = {
    "config": 0,
    "runtime": 0,
    "endpoint": 0,
    "data": 1,
    "model": 2,
    "plan": 2,
    "generate": 3,
    "retrieve": 3,
    "eval": 4,
    "serve": 4,
    "synth": 4,
    "train": 5,
    "runs": 6,
    "sweep": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 7,
}


def _unit(path: Path, src: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    return rel.parts[0]


def _imports(path: Path, src: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    pkg_parts = path.relative_to(src.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import -> absolute
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                found.append((".".join([*base, node.module or ""]).rstrip("."), node.lineno))
            elif node.module:
                found.append((node.module, node.lineno))
    return found


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        me = _unit(path, src)
        assert me in LAYER, (
            f"{path}: module '{me}' is not in the layer table; add it to docs/architecture.md and here"
        )
        for name, line in _imports(path, src):
            parts = name.split(".")
            if parts[0] != "tunesmith" or len(parts) < 2:
                continue
            other = parts[1]
            if other not in LAYER:
                bad.append(f"{path.relative_to(src)}:{line}: imports unknown module tunesmith.{other}")
            elif LAYER[other] > LAYER[me]:
                where = f"{path.relative_to(src)}:{line}"
                bad.append(f"{where}: layer {LAYER[me]} '{me}' imports layer {LAYER[other]} '{other}'")
    return bad


def test_imports_point_down():
    assert violations() == []


def test_checker_catches_an_upward_import(tmp_path):
    # The checker itself must be able to fail: a data module importing train is flagged, relative too.
    fake = tmp_path / "tunesmith"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "x.py").write_text(
        "from tunesmith.train import loop\nimport tunesmith.config\nfrom ..eval import metrics\n"
    )
    assert violations(fake) == [
        "data/x.py:1: layer 1 'data' imports layer 5 'train'",
        "data/x.py:3: layer 1 'data' imports layer 4 'eval'",
    ]


def test_no_grab_bag_modules():
    names = {p.stem for p in SRC.rglob("*.py")}
    assert not names & {"utils", "helpers", "common", "misc"}


def doc_layers(doc: Path = DOC) -> list[tuple[int, str, bool]]:
    """(layer, module path, planned) for every module named in the doc's layer table (## Layers)."""
    section = doc.read_text().split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    assert rows, f"{doc}: no layer table under '## Layers'"
    return [
        (int(layer), name, bool(planned))
        for layer, cell in rows
        for name, planned in re.findall(r"`([^`]+)`( \(planned\))?", cell)
    ]


def test_layer_table_in_the_docs_is_this_map():
    # the doc cannot drift: its layer and module columns are exactly what violations() enforces
    table: dict[str, int] = {}
    for layer, name, _ in doc_layers():
        unit = name.split("/")[0].removesuffix(".py")
        assert table.setdefault(unit, layer) == layer, (
            f"docs/architecture.md: '{unit}' is in layers {table[unit]} and {layer}"
        )
    assert table == LAYER


def test_every_module_is_in_the_table_and_planned_rooms_are_not_built_yet():
    named = {name: planned for _, name, planned in doc_layers()}
    units = {name.split("/")[0].removesuffix(".py") for name in named}
    for path in sorted(SRC.rglob("*.py")):
        assert _unit(path, SRC) in units, (
            f"{path.relative_to(SRC)} is in no row of the docs/architecture.md layer table"
        )
    for name, planned in named.items():
        exists = (SRC / name).exists()
        assert exists != planned, (
            f"docs/architecture.md: `{name}` is {'marked (planned) but exists' if exists else 'missing'}"
        )


def test_doc_parser_reads_planned_rooms_and_subpackages(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text(
        "# x\n\n## Layers\n\n| layer | module(s) | owns |\n|---|---|---|\n"
        "| 0 | `config.py` | `not_a_module.py` in another column |\n"
        "| 2 | `model/`, `model/loss.py` (planned) | models |\n\n## Next\n| 9 | `ignored.py` | |\n"
    )
    assert doc_layers(doc) == [(0, "config.py", False), (2, "model/", False), (2, "model/loss.py", True)]
