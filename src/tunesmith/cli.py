"""One Typer app: argv -> config -> one call per command. Each command imports its stage lazily."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from tunesmith.config import TrainingDiverged, UserError, describe, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune a pretrained LLM on your data: inspect, plan, train, compare, serve.",
)
config_app = typer.Typer(no_args_is_help=True, help="Show the resolved config.")
data_app = typer.Typer(no_args_is_help=True, help="Look at and prepare the dataset.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
console = Console()

CONFIG = typer.Argument(..., help="config YAML")
OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-4 data.max_length=256")


def _cfg(config: Path, overrides: list[str] | None):
    return load_config(config, overrides or [])


@config_app.command("show")
def config_show(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Print the resolved config tree with each field's description."""
    from rich.table import Table

    cfg = _cfg(config, overrides)
    table = Table(show_header=True, header_style="bold")
    for col in ("key", "value", "description"):
        table.add_column(col)
    for key, value, desc in describe(cfg):
        table.add_row(key, json.dumps(value, default=str), desc)
    console.print(table)


@config_app.command("get")
def config_get(
    config: Path = CONFIG,
    key: str = typer.Argument(..., help="dotted key, e.g. out_dir"),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Print one resolved value (for scripts)."""
    values = {k: v for k, v, _ in describe(_cfg(config, overrides))}
    if key not in values:
        raise UserError(f"{config}: no key '{key}' (see `tunesmith config show`)")
    print(values[key] if isinstance(values[key], str) else json.dumps(values[key], default=str))


@data_app.command("inspect")
def data_inspect(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """What will be learned: counts, lengths, truncation, duplicates, leakage, rendered examples."""
    from tunesmith.data.inspect import inspect_data, print_inspect
    from tunesmith.model.load import load_tokenizer

    cfg = _cfg(config, overrides)
    tok = load_tokenizer(cfg.model)
    report = inspect_data(cfg, tok, Path(cfg.out_dir))
    print_inspect(report, tok, console)
    _preflight(cfg, tok)  # the warnings train would print; its first error fails inspect the same way


def _preflight(cfg, tok, auto: str = "recorded_or_pool"):
    """The data as train builds it (cached in <out_dir>/data), checked as train checks it.

    Warnings first, then the first error. `auto`: which pairs data.limit=auto takes (data/pipeline.py).
    """
    from tunesmith.data.pipeline import build, build_heldout
    from tunesmith.train.preflight import check

    streaming = cfg.data.streaming
    data = build_heldout(cfg, tok, cfg.out_dir) if streaming else build(cfg, tok, cfg.out_dir, auto)
    check(
        cfg,
        tok,
        data,
        warn=lambda line: Console(stderr=True).print(
            line, style="yellow", markup=False, highlight=False, soft_wrap=True
        ),
    )
    return data


@data_app.command("prepare")
def data_prepare(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Tokenize the splits into <out_dir>/data/ (reused by train)."""
    from tunesmith.data.pipeline import prepare
    from tunesmith.model.load import load_tokenizer

    cfg = _cfg(config, overrides)
    console.print(f"prepared: {prepare(cfg, load_tokenizer(cfg.model))}")


@app.command()
def plan(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    device: str = typer.Option(None, help="device to plan for, e.g. h100-80gb"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """FLOPs, memory and time before training (a run dir: predicted vs measured)."""
    from tunesmith.train.run_plan import plan_for_data, plan_from_run, print_plan

    if config.is_dir():
        result = plan_from_run(config)
    else:
        from tunesmith.model.load import load_tokenizer

        cfg = _cfg(config, overrides)
        if device:
            cfg.plan.device = device
        # The data's real token counts (packing considered) make the step count and FLOPs exact.
        data = _preflight(cfg, load_tokenizer(cfg.model), auto="pool")
        if cfg.train.time_budget is not None and not cfg.data.streaming:
            from tunesmith.train.budget import plan_with_budget

            result = plan_with_budget(cfg, data)  # the sized run, from the planner's speed
        else:
            result = plan_for_data(cfg, data.train)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "plan.json").write_text(json.dumps(result, indent=2, default=str))
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_plan(result, console)
        if result.get("budget"):
            from tunesmith.plan.budget import sizing_lines

            for line in sizing_lines(result["budget"]):
                console.print(line, markup=False, highlight=False)


@app.command()
def train(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Fine-tune (full or LoRA) into <out_dir>. Under torchrun: python -m tunesmith train ..."""
    from tunesmith.train.loop import train as run_train

    result = run_train(_cfg(config, overrides))
    if result.get("eval"):
        console.print(
            f"eval loss {result['eval']['loss']:.4f}  perplexity {result['eval']['perplexity']:.2f}"
        )


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="run directory"),
    out: Path = typer.Option(None, help="output dir (default <run>/export, or <run>/export-best for best/)"),
    merge: bool = typer.Option(False, help="merge a LoRA adapter into a full model"),
    gguf: bool = typer.Option(False, "--gguf", help="write GGUF files + Ollama Modelfile (adapter merged)"),
    quant: list[str] = typer.Option(
        None, help="with --gguf: f16 (default), bf16, f32, q8_0, q4_k_m, ... (repeat it or give a comma list)"
    ),
    from_: str = typer.Option("final", "--from", help="final or best: which model of the run"),
) -> None:
    """Write the run's model (or its best/ or final/) as a plain HF dir (merged) or PEFT adapter, or GGUF."""
    from tunesmith.model.export import export as run_export

    if from_ not in ("final", "best") or (from_ == "best" and not (run_dir / "best").is_dir()):
        raise UserError(f"export --from {from_}: use final, or best for a run with a best/ dir ({run_dir})")
    run_dir = run_dir / "best" if from_ == "best" else run_dir
    # runs/x/best is a model dir inside a run: its export goes beside it, never into the model dir itself
    inside = run_dir.name in ("best", "final") and (run_dir.parent / "config.yaml").is_file()
    default = run_dir.parent / f"export-{run_dir.name}" if inside else run_dir / "export"
    if not gguf:
        console.print(f"exported: {run_export(run_dir, out or default, merge)}")
        return
    from tunesmith.model.gguf import export_gguf, model_name

    files = export_gguf(run_dir, out or default, quant or [])
    first = files[0]  # the first --quant's GGUF, the one the Modelfile names
    lines = [f"wrote {f}" for f in files]
    lines += [
        f"ollama create {model_name(run_dir)} -f {first.parent / 'Modelfile'}",
        f"llama-cli -m {first} -cnv",
    ]
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


@app.command()
def generate(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    prompt: str = typer.Option(None, help="one prompt"),
    input: Path = typer.Option(None, help='prompts.jsonl (one {"prompt"|"question"...} per line)'),
    output: Path = typer.Option(None, help="write completions here (jsonl)"),
) -> None:
    """Generate with the model (batched, with the template it was trained with)."""
    from tunesmith.generate import generate as run_generate
    from tunesmith.generate import prompt_ids

    if (prompt is None) == (input is None):
        raise UserError("generate: give exactly one of --prompt or --input")
    cfg = _cfg(config, overrides)
    convs = [[{"role": "user", "content": prompt}]] if prompt is not None else _read_prompts(input)
    model, tokenizer, template = _generator(cfg)
    ids = [prompt_ids(template, tokenizer, c) for c in convs]
    results = run_generate(model, tokenizer, ids, cfg.generate, progress=input is not None)
    rows = [
        {
            "prompt": c[-1]["content"],
            "answer": r.text,
            "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": len(r.ids),
        }
        for c, r in zip(convs, results, strict=True)
    ]
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:  # plain print: stdout is for the answers (pipes), not for rich's markup
        for r in rows:
            print(r["answer"] if prompt is not None else json.dumps(r, ensure_ascii=False))


def _generator(cfg):
    """(model, tokenizer, template) for model.name (a trained run: model.name=<run>/final)."""
    from tunesmith.generate import template_for
    from tunesmith.model.export import load_for_inference
    from tunesmith.runtime import device

    # Explicit beats clever: the model is what model.name says, never silently the run's final/.
    model, tokenizer, stored = load_for_inference(cfg.model.name, cfg.model, device())
    return model, tokenizer, template_for(stored, cfg)


def _read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """jsonl rows with `messages`, or a `prompt`/`question`/`instruction` string -> conversations."""
    from tunesmith.data.rejects import Rejects
    from tunesmith.data.sources import read_jsonl

    out = []
    for row in read_jsonl(Path(path), Rejects("fail")):  # a bad line is a UserError at its file:line
        text = next(
            (
                row.fields[k]
                for k in ("prompt", "question", "instruction")
                if isinstance(row.fields.get(k), str)
            ),
            None,
        )
        if isinstance(row.fields.get("messages"), list):
            out.append(row.fields["messages"])
        elif text is not None:
            out.append([{"role": "user", "content": text}])
        else:
            raise UserError(f"{row.where}: row needs 'prompt', 'question', 'instruction' or 'messages'")
    return out


@app.command()
def chat(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Interactive multi-turn chat, streaming: /reset clears the history, /exit (or Ctrl-D) leaves."""
    from tunesmith.generate import prompt_ids, stream

    cfg = _cfg(config, overrides)
    model, tokenizer, template = _generator(cfg)
    history: list[dict[str, str]] = []
    if template.kind != "chat":
        console.print("[dim]string template: each question is answered on its own (no history)[/dim]")
    while True:
        try:
            text = console.input("[bold]you> [/bold]").strip()
        except EOFError:
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset" or not text:
            history = [] if text else history
            continue
        history.append({"role": "user", "content": text})
        pieces = []
        console.print("[bold]model> [/bold]", end="")
        for piece in stream(model, tokenizer, prompt_ids(template, tokenizer, history), cfg.generate):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": "".join(pieces)})


@app.command("eval")
def evaluate(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Evaluate one model (model.name: any model or <run>/final) on the test split."""
    from tunesmith.eval.compare import evaluate_cli

    evaluate_cli(_cfg(config, overrides), console)


@app.command()
def compare(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Base vs fine-tuned on the same prompts: predictions, metrics, report.html."""
    from tunesmith.eval.compare import compare_cli
    from tunesmith.train.track import log_report

    cfg = _cfg(config, overrides)
    compare_cli(cfg, console)
    log_report(cfg)  # the report joins the run's experiment trackers (train.report_to), if it used any


@app.command()
def serve(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """OpenAI-compatible API and a side-by-side playground at http://host:port/."""
    from tunesmith.serve.app import serve as run_serve

    run_serve(_cfg(config, overrides))


@app.command()
def synth(
    docs: list[Path] = typer.Argument(..., help="documents or folders (.md .txt .rst .html .pdf)"),
    out: Path = typer.Option(..., help="output qa.jsonl"),
    config: Path = typer.Option(None, help="config YAML (synth: section)"),
    overrides: list[str] = typer.Option(None, "--set", help="dotted override, repeatable"),
) -> None:
    """Turn documents into QA pairs with an LLM."""
    from tunesmith.synth.run import synth_cli

    synth_cli(load_config(config, overrides or []), docs, out, console)


@app.command()
def sweep(
    config: Path = CONFIG,
    keys: list[str] = typer.Argument(
        None,
        help="swept keys and overrides: KEY=V1,V2,... sweeps those values; --search also takes "
        "KEY=log:LOW:HIGH, KEY=float:LOW:HIGH, KEY=int:LOW:HIGH (ends included), KEY=cat:A,B,...; "
        "any other KEY=VALUE applies to every trial",
    ),
    grid: bool = typer.Option(False, "--grid", help="run every combination of the listed values"),
    search: bool = typer.Option(
        False, "--search", help="Optuna TPE over the ranges, pruning on eval loss (sweep.prune)"
    ),
    trials: int = typer.Option(None, "--trials", help="--search budget (default: sweep.trials)"),
    workers: int = typer.Option(1, "--workers", help="local worker processes sharing the study"),
) -> None:
    """Grid or Optuna search: one run dir per trial, results.jsonl/.csv, a plot per key, best.yaml.

    Re-run the same command to resume. Several workers: --workers N, or the same command on each machine.

    One database for all machines: sweep.storage=postgresql://user:pass@host/db (default: SQLite).

    tunesmith sweep cfg.yaml --grid train.lr=1e-4,3e-4 lora.r=8,32 train.max_steps=200

    tunesmith sweep cfg.yaml --search train.lr=log:1e-5:1e-3 lora.r=int:4:64 --trials 16
    """
    from tunesmith.sweep.run import sweep as run_sweep

    if grid == search:
        raise UserError("sweep: give exactly one of --grid or --search (see `tunesmith sweep --help`)")
    run_sweep(config, keys or [], search, trials, workers, console)


class _RunsGroup(TyperGroup):
    """`runs [DIR] [options]` lists, `runs compare A B` compares. Click would take `compare` for DIR and stop
    reading options at DIR: a first word naming a subcommand goes to it, otherwise options may follow DIR."""

    def parse_args(self, ctx, args):
        if args and args[0] in self.commands:
            return super().parse_args(ctx, ["runs", *args])
        ctx.allow_interspersed_args = True
        return super().parse_args(ctx, args)


runs_app = typer.Typer(
    cls=_RunsGroup,
    invoke_without_command=True,
    subcommand_metavar="[compare RUN RUN ...]",
    help="List run dirs as one table (`runs [DIR]`), or compare runs on one HTML page (`runs compare A B`).",
)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
def runs(
    ctx: typer.Context,
    root: Path = typer.Argument(Path("runs"), metavar="DIR", help="dir of run dirs (searched recursively)"),
    sort: str = typer.Option(None, help="column to sort by, e.g. final_eval_loss (see --json for the keys)"),
    desc: bool = typer.Option(False, "--desc", help="sort in descending order"),
    filters: list[str] = typer.Option(None, "--filter", help="key=value (wildcards ok), repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of rows (stable keys)"),
) -> None:
    """Every run under DIR: model, data, hyperparameters, steps, tokens/s, eval loss, metrics, status."""
    if ctx.invoked_subcommand is None:
        from tunesmith.runs.table import runs_cli

        runs_cli(root, sort, desc, filters or [], as_json, console)


@runs_app.command("compare")
def runs_compare(
    run_dirs: list[Path] = typer.Argument(..., help="two or more run dirs"),
    out: Path = typer.Option(Path("runs_compare.html"), help="the HTML page to write"),
) -> None:
    """Loss curves, config diff, metrics and differing answers of two or more runs on one HTML page."""
    from tunesmith.runs.compare import compare_runs

    console.print(f"report: {escape(str(compare_runs(run_dirs, out)))}")


def main() -> None:
    """Console entry point: user errors are one line on stderr with exit code 2."""
    # Libraries' deprecation chatter (e.g. transformers' is_gradient_checkpointing) is not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except UserError as e:  # escaped: a message quotes user data, whose "[...]" is not rich markup
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except TrainingDiverged as e:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
