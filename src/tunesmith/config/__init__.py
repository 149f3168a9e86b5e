"""tunesmith's config: one YAML file -> one tree of typed pydantic models (no torch import here).

`tunesmith config show` must be instant. The schema is in `schema.py`, loading, overrides and the one-line
errors with "did you mean" in `load.py`, the exceptions every layer raises in `errors.py`.
"""

from .errors import TrainingDiverged, UserError
from .load import describe, load_config, parse_overrides, save_config, suggest_key
from .schema import (
    Config,
    DataConfig,
    EvalConfig,
    GenerateConfig,
    JudgeConfig,
    LmEvalConfig,
    LoraConfig,
    ModelConfig,
    PlanConfig,
    ServeConfig,
    SourceConfig,
    SynthConfig,
    TrainConfig,
)

__all__ = [
    "TrainingDiverged",
    "UserError",
    "describe",
    "load_config",
    "parse_overrides",
    "save_config",
    "suggest_key",
    "ModelConfig",
    "SourceConfig",
    "DataConfig",
    "TrainConfig",
    "LoraConfig",
    "JudgeConfig",
    "LmEvalConfig",
    "EvalConfig",
    "GenerateConfig",
    "ServeConfig",
    "SynthConfig",
    "PlanConfig",
    "Config",
]
