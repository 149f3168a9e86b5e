"""EleutherAI lm-eval harness on a saved model, through its HF backend (optional extra `tunesmith[lm-eval]`).

We hand lm-eval a directory (a full HF model, or a PEFT adapter whose base it loads underneath) and keep
only what a report needs: {task: {metric: value}}; the harness's own result JSON is saved next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.config import LmEvalConfig, UserError


def model_args(model_path: str, device: str) -> str:
    """lm-eval's HF `model_args`: a full model dir, or a PEFT adapter dir on top of its recorded base."""
    # fp32 on CPU (bf16 matmuls are slow there and change the numbers); the checkpoint's dtype elsewhere
    dtype = "float32" if device == "cpu" else "auto"
    adapter = Path(model_path) / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"{adapter}: no base_model_name_or_path (export a merged model with lora.merge=true)"
            )
        return f"pretrained={base},peft={model_path},dtype={dtype}"
    return f"pretrained={model_path},dtype={dtype}"


def _metrics_of(task_results: dict) -> dict[str, float]:
    """{'acc,none': 0.5, 'alias': 'x'} -> {'acc': 0.5}; a non-default filter keeps its name ('acc,strict')."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return out


def run_lm_eval(model_path: str, cfg: LmEvalConfig, device: str, out: Path) -> dict:
    """Run cfg.tasks on the model in `model_path`; {task: {metric: value}}, also in out/lm_eval.json."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "eval.lm_eval: the lm-eval package is not installed (pip install 'tunesmith[lm-eval]', "
            "or set eval.lm_eval: null)"
        ) from None

    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise UserError(f"eval.lm_eval.include_path: {cfg.include_path} is not a directory of task yamls")
    manager = None
    if cfg.include_path is not None:
        # Indexing lm-eval's ~15k built-in task yamls takes ~13 s on a small CPU: skip it when the
        # custom directory already defines every requested task.
        manager = TaskManager(include_path=cfg.include_path, include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in cfg.tasks):
        manager = TaskManager(include_path=cfg.include_path)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {cfg.include_path}" if cfg.include_path else ""
        raise UserError(
            f"eval.lm_eval.tasks: unknown task(s) {', '.join(unknown)} (not built into lm-eval{where}; "
            f"see `lm-eval ls tasks`)"
        )
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args(model_path, device),
        tasks=list(cfg.tasks),
        task_manager=manager,
        device=device,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        log_samples=False,  # per-sample dumps can be huge; the report only needs the aggregates
    )
    if results is None:  # only on non-zero ranks under torch.distributed; we run lm-eval on one process
        raise RuntimeError("lm-eval returned no results (run it on rank 0 only)")
    summary = {task: _metrics_of(values) for task, values in results["results"].items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keep = {
        k: results[k]
        for k in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
        if k in results
    }
    (out / "lm_eval.json").write_text(json.dumps({"summary": summary, **keep}, indent=2, default=str))
    return summary
