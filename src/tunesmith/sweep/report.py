"""What a sweep leaves in its dir: results.jsonl / results.csv, a table, one plot per swept key, best.yaml.

Every worker writes them when it runs out of trials (each file whole: tmp + rename), so the last worker to
finish leaves the complete picture; a resumed or half-done sweep shows its waiting and running trials too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from tunesmith.config import load_config, save_config

from .space import Dim, override


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def result_rows(study, metric: str) -> list[dict[str, Any]]:
    """One row per trial: trial, status, params, metric (a pruned trial: its last reported value), run_dir."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("over_budget"):
            continue
        value = t.value if t.value is not None else None
        if value is None and t.state.name == "PRUNED" and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        params = t.params or t.system_attrs.get("fixed_params", {})
        rows.append(
            {
                "trial": t.number,
                "status": t.state.name.lower(),
                "params": dict(params),
                metric: value,
                "run_dir": t.user_attrs.get("run_dir"),
                "note": t.user_attrs.get("note", ""),
            }
        )
    return rows


def write_results(rows: list[dict], dims: list[Dim], metric: str, sweep_dir: Path) -> None:
    """results.jsonl (one object per trial) and results.csv (one column per swept key)."""
    _write(sweep_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["trial", "status", *[d.key for d in dims], metric, "run_dir", "note"])
    for r in rows:
        params = [r["params"].get(d.key, "") for d in dims]
        out.writerow([r["trial"], r["status"], *params, r[metric], r["run_dir"] or "", r["note"]])
    _write(sweep_dir / "results.csv", buf.getvalue())


def print_table(rows: list[dict], dims: list[Dim], metric: str, best: int | None, console) -> None:
    """The results as a Rich table, the best trial marked."""
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for col in ("trial", "status", *[d.key for d in dims], metric, "run dir"):
        table.add_column(col)
    for r in rows:
        value = r[metric]
        shown = "" if value is None else f"{value:.5g}"
        mark = " *" if r["trial"] == best else ""
        cells = [_cell(r["params"].get(d.key, "")) for d in dims]
        table.add_row(f"{r['trial']}{mark}", r["status"], *cells, shown, r["run_dir"] or "")
    console.print(table)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _label(key: str) -> str:
    return "training examples (data.limit)" if key == "data.limit" else key


def plot_key(rows: list[dict], dim: Dim, metric: str, minimize: bool, path: Path) -> dict | None:
    """metric vs this key's value, a line through the best per value; its labels (None: nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        (r["params"][dim.key], r[metric], r["status"])
        for r in rows
        if dim.key in r["params"] and isinstance(r[metric], (int, float)) and math.isfinite(r[metric])
    ]
    if not points:
        return None
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
    order = sorted({x for x, _, _ in points}, key=lambda v: v if numeric else str(v))
    pos = (lambda v: v) if numeric else (lambda v: order.index(v))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for status, style in (("complete", "o"), ("pruned", "x")):
        xs = [pos(x) for x, _, s in points if s == status]
        ys = [y for x, y, s in points if s == status]
        if xs:
            ax.plot(xs, ys, style, label=status, alpha=0.7)
    pick = min if minimize else max
    best = [pick(y for x, y, s in points if x == v and s == "complete") for v in order if _done(points, v)]
    ax.plot([pos(v) for v in order if _done(points, v)], best, "-", color="C0", label="best per value")
    if not numeric:
        ax.set_xticks(range(len(order)), [str(v) for v in order])
    elif dim.kind == "log" or (min(order) > 0 and max(order) / min(order) >= 3):  # lr, data sizes
        ax.set_xscale("log")
    title = "data-scaling curve" if dim.key == "data.limit" else f"{metric} vs {dim.key}"
    labels = {"xlabel": _label(dim.key), "ylabel": metric, "title": title}
    ax.set(**labels)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return labels


def _done(points: list, value: Any) -> bool:
    return any(x == value and s == "complete" for x, _, s in points)


def plot_path(sweep_dir: Path, key: str) -> Path:
    """<sweep dir>/plot-<key>.png (dots kept: plot-train.lr.png)."""
    return sweep_dir / f"plot-{key}.png"


def write_best(config: Path, overrides: list[str], best, metric: str, sweep_dir: Path) -> Path:
    """best.yaml: the best trial's resolved config (out_dir: its run dir), loadable by `tunesmith train`."""
    point = [override(k, v) for k, v in best.params.items()]
    cfg = load_config(config, [*overrides, *point, f"out_dir={best.user_attrs['run_dir']}"])
    path = sweep_dir / "best.yaml"
    save_config(cfg, path)
    head = f"# best trial {best.number}: {metric}={best.value:.6g} ({', '.join(point)})\n"
    _write(path, head + path.read_text(encoding="utf-8"))
    return path
