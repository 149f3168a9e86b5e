"""Imports point down the pipeline (DESIGN.md's layer table); parsed with ast, nothing imported."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"

# module (first component under tunesmith) -> layer; same-layer imports are allowed.
LAYER = {
    "config": 0, "runtime": 0,
    "data": 1,
    "model": 2, "plan": 2,
    "generate": 3,
    "eval": 4, "serve": 4, "synth": 4,
    "train": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
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
        assert me in LAYER, f"{path}: module '{me}' is not in the layer table; add it to DESIGN.md and here"
        for name, line in _imports(path, src):
            parts = name.split(".")
            if parts[0] != "tunesmith" or len(parts) < 2:
                continue
            other = parts[1]
            if other not in LAYER:
                bad.append(f"{path.relative_to(src)}:{line}: imports unknown module tunesmith.{other}")
            elif LAYER[other] > LAYER[me]:
                bad.append(f"{path.relative_to(src)}:{line}: layer {LAYER[me]} '{me}' imports layer {LAYER[other]} '{other}'")
    return bad


def test_imports_point_down():
    assert violations() == []


def test_checker_catches_an_upward_import(tmp_path):
    # The checker itself must be able to fail: a data module importing train is flagged, relative too.
    fake = tmp_path / "tunesmith"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "x.py").write_text("from tunesmith.train import loop\nimport tunesmith.config\nfrom ..eval import metrics\n")
    assert violations(fake) == [
        "data/x.py:1: layer 1 'data' imports layer 5 'train'",
        "data/x.py:3: layer 1 'data' imports layer 4 'eval'",
    ]


def test_no_grab_bag_modules():
    names = {p.stem for p in SRC.rglob("*.py")}
    assert not names & {"utils", "helpers", "common", "misc"}
