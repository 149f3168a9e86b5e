"""One Typer app: argv -> config -> one call per command. Each command imports its stage lazily."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tunesmith.config import UserError, describe, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune a pretrained LLM on your data: inspect, plan, train, compare, serve.")
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
def config_get(config: Path = CONFIG, key: str = typer.Argument(..., help="dotted key, e.g. out_dir"),
               overrides: list[str] = OVERRIDES) -> None:
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


def _preflight(cfg, tok):
    """The data as train builds it (cached in <out_dir>/data), checked as train checks it: warnings, then the first error."""
    from tunesmith.data.pipeline import build, build_heldout
    from tunesmith.train.preflight import check

    data = (build_heldout if cfg.data.streaming else build)(cfg, tok, cfg.out_dir)
    check(cfg, tok, data, warn=lambda line: Console(stderr=True).print(line, style="yellow", markup=False, highlight=False,
                                                                      soft_wrap=True))
    return data


@data_app.command("prepare")
def data_prepare(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Tokenize the splits into <out_dir>/data/ (reused by train)."""
    from tunesmith.data.pipeline import prepare
    from tunesmith.model.load import load_tokenizer

    cfg = _cfg(config, overrides)
    console.print(f"prepared: {prepare(cfg, load_tokenizer(cfg.model))}")


@app.command()
def plan(config: Path = CONFIG, overrides: list[str] = OVERRIDES,
         device: str = typer.Option(None, help="device to plan for, e.g. h100-80gb"),
         as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """FLOPs, memory and time before training (a run dir: predicted vs measured)."""
    from tunesmith.train.plan_io import plan_for_data, plan_from_run, print_plan

    if config.is_dir():
        result = plan_from_run(config)
    else:
        from tunesmith.model.load import load_tokenizer

        cfg = _cfg(config, overrides)
        if device:
            cfg.plan.device = device
        # The data's real token counts (packing considered) make the step count and FLOPs exact.
        samples = _preflight(cfg, load_tokenizer(cfg.model)).train
        result = plan_for_data(cfg, samples)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "plan.json").write_text(json.dumps(result, indent=2, default=str))
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_plan(result, console)


@app.command()
def train(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Fine-tune (full or LoRA) into <out_dir>. Under torchrun: python -m tunesmith train ..."""
    from tunesmith.train.loop import train as run_train

    result = run_train(_cfg(config, overrides))
    if result.get("eval"):
        console.print(f"eval loss {result['eval']['loss']:.4f}  perplexity {result['eval']['perplexity']:.2f}")


@app.command()
def export(run_dir: Path = typer.Argument(..., help="run directory"),
           out: Path = typer.Option(None, help="output dir (default <run>/export)"),
           merge: bool = typer.Option(False, help="merge a LoRA adapter into a full model")) -> None:
    """Write the run's model as a plain HF dir (merged) or PEFT adapter."""
    from tunesmith.model.export import export as run_export

    console.print(f"exported: {run_export(run_dir, out or run_dir / 'export', merge)}")


@app.command()
def generate(config: Path = CONFIG, overrides: list[str] = OVERRIDES,
             prompt: str = typer.Option(None, help="one prompt"),
             input: Path = typer.Option(None, help="prompts.jsonl (one {\"prompt\"|\"question\"...} per line)"),
             output: Path = typer.Option(None, help="write completions here (jsonl)")) -> None:
    """Generate with the model (batched, with the template it was trained with)."""
    from tunesmith.generate import generate_cli

    if (prompt is None) == (input is None):
        raise UserError("generate: give exactly one of --prompt or --input")
    generate_cli(_cfg(config, overrides), prompt, input, output)


@app.command()
def chat(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Interactive multi-turn chat, streaming."""
    from tunesmith.generate import chat_loop

    chat_loop(_cfg(config, overrides), console)


@app.command("eval")
def evaluate(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Evaluate one model (model.name: any model or <run>/final) on the test split."""
    from tunesmith.eval.compare import evaluate_cli

    evaluate_cli(_cfg(config, overrides), console)


@app.command()
def compare(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Base vs fine-tuned on the same prompts: predictions, metrics, report.html."""
    from tunesmith.eval.compare import compare_cli

    compare_cli(_cfg(config, overrides), console)


@app.command()
def serve(config: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """OpenAI-compatible API and a side-by-side playground at http://host:port/."""
    from tunesmith.serve.app import serve as run_serve

    run_serve(_cfg(config, overrides))


@app.command()
def synth(docs: list[Path] = typer.Argument(..., help="documents or folders (.md .txt .rst .html .pdf)"),
          out: Path = typer.Option(..., help="output qa.jsonl"),
          config: Path = typer.Option(None, help="config YAML (synth: section)"),
          overrides: list[str] = typer.Option(None, "--set", help="dotted override, repeatable")) -> None:
    """Turn documents into QA pairs with an LLM."""
    from tunesmith.synth import synth_cli

    synth_cli(load_config(config, overrides or []), docs, out, console)


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
    except RuntimeError as e:
        if type(e).__name__ == "TrainingDiverged":
            Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(1)
        raise
