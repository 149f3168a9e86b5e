"""tunesmith: turn a general pretrained LLM into a specialist on your own data.

The Python API mirrors the CLI: `cfg = load_config("cfg.yaml", ["train.lr=1e-4"])`, then `train(cfg)`,
`compare(cfg)`, `evaluate(cfg)`. Heavy modules load on first use, so `import tunesmith` is cheap.
"""

from tunesmith.config import Config, UserError, load_config

__all__ = ["Config", "UserError", "load_config", "train", "compare", "evaluate"]
__version__ = "0.1.0"


def train(config: Config) -> dict:
    """Fine-tune per `config`; returns final metrics and the run dir (`tunesmith train`)."""
    from tunesmith.train.loop import train as run

    return run(config)


def compare(config: Config) -> dict:
    """Base vs fine-tuned on the test split; writes <out_dir>/eval/ (`tunesmith compare`)."""
    from tunesmith.eval.compare import compare as run

    return run(config)


def evaluate(config: Config) -> dict:
    """Evaluate `config.model.name` on the test split (`tunesmith eval`)."""
    from tunesmith.eval.compare import evaluate as run

    return run(config)
