"""lm-eval offline on a custom task (yaml + local jsonl) against a tiny Llama; the numbers are re-derived here
from the model's own log-probabilities."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import tiny
from tunesmith.config import LmEvalConfig, UserError
from tunesmith.eval.lm_eval import model_args, run_lm_eval

DOCS = [
    {
        "question": "What was the revenue of Acme in Q3 2020?",
        "choices": ["$34 million", "1,200 employees", "42 percent"],
        "label": 0,
    },
    {
        "question": "How many employees does the company have?",
        "choices": ["$34 million", "1,200 employees"],
        "label": 1,
    },
    {"question": "What is the margin?", "choices": ["42 percent", "the lazy dog"], "label": 0},
    {"question": "Who jumps over the lazy dog?", "choices": ["The quick brown fox", "EBITDA"], "label": 0},
]
CONTEXT = "Question: {question}\nAnswer:"

MC_YAML = """task: tunesmith_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

LL_YAML = """task: tunesmith_tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "Question: {{{{question}}}}\\nAnswer: "
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    ll_docs = [{"question": d["question"], "answer": d["choices"][d["label"]]} for d in DOCS]
    (root / "ll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ll_docs))
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=root / "mc.jsonl"))
    (tasks / "tiny_ll.yaml").write_text(LL_YAML.format(data=root / "ll.jsonl"))
    return tasks


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) the way lm-eval's HF backend scores it: trailing spaces of the context
    move to the continuation, the pair is tokenised whole, continuation = the tokens after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    logp = model(torch.tensor([whole])).logits.float().log_softmax(-1)[0]  # (T, V)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_run_lm_eval_matches_our_own_loglikelihoods(tmp_path):
    model_dir = tiny.save_model_dir(tmp_path / "tiny-llama", arch="llama")
    cfg = LmEvalConfig(
        tasks=["tunesmith_tiny_mc", "tunesmith_tiny_ll"],
        include_path=str(write_tasks(tmp_path)),
        batch_size=2,
    )
    got = run_lm_eval(str(model_dir), cfg, "cpu", tmp_path / "eval")

    assert set(got) == {"tunesmith_tiny_mc", "tunesmith_tiny_ll"}
    mc, ll = got["tunesmith_tiny_mc"], got["tunesmith_tiny_ll"]
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0 and ll["perplexity"] >= 1.0
    saved = json.loads((tmp_path / "eval" / "lm_eval.json").read_text())
    assert saved["summary"] == got and "tunesmith_tiny_mc" in saved["results"]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    hits, hits_norm, doc_lls = 0, 0, []
    for d in DOCS:
        ctx = CONTEXT.format(question=d["question"])
        # multiple_choice scores " " + choice (lm-eval's default target delimiter) after the context
        lls = [loglikelihood(model, tok, ctx, " " + c) for c in d["choices"]]
        hits += max(range(len(lls)), key=lls.__getitem__) == d["label"]
        normed = [x / len(c) for x, c in zip(lls, d["choices"], strict=True)]  # acc_norm: per character
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == d["label"]
        doc_lls.append(loglikelihood(model, tok, ctx + " ", d["choices"][d["label"]]))
    assert mc["acc"] == hits / len(DOCS)
    assert mc["acc_norm"] == hits_norm / len(DOCS)
    # lm-eval's "perplexity" aggregation is exp(-mean per-document loglikelihood)
    assert math.log(ll["perplexity"]) == pytest.approx(-sum(doc_lls) / len(doc_lls), rel=1e-4)


def test_limit(tmp_path):
    model_dir = tiny.save_model_dir(tmp_path / "tiny-neox")
    tasks = write_tasks(tmp_path)
    cfg = LmEvalConfig(tasks=["tunesmith_tiny_mc"], include_path=str(tasks), limit=2, batch_size=4)
    got = run_lm_eval(str(model_dir), cfg, "cpu", tmp_path / "eval")
    assert got["tunesmith_tiny_mc"]["acc"] in (0.0, 0.5, 1.0)  # 2 examples
    assert (
        json.loads((tmp_path / "eval" / "lm_eval.json").read_text())["n-samples"]["tunesmith_tiny_mc"][
            "effective"
        ]
        == 2
    )


@pytest.mark.slow  # an unknown name makes lm-eval index its ~15k built-in task yamls (~15-20 s here)
def test_unknown_task_is_a_user_error(tmp_path):
    tasks = write_tasks(tmp_path)
    with pytest.raises(UserError, match=r"unknown task\(s\) no_such_task_xyz \(not built into lm-eval or in"):
        run_lm_eval(
            "/unused", LmEvalConfig(tasks=["no_such_task_xyz"], include_path=str(tasks)), "cpu", tmp_path
        )


def test_model_args_for_full_model_and_adapter(tmp_path):
    assert model_args("/m", "cpu") == "pretrained=/m,dtype=float32"
    assert model_args("/m", "cuda") == "pretrained=/m,dtype=auto"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/base"}))
    assert model_args(str(tmp_path), "cpu") == f"pretrained=/base,peft={tmp_path},dtype=float32"


def test_missing_lm_eval_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    with pytest.raises(UserError, match=r"pip install 'tunesmith\[lm-eval\]'"):
        run_lm_eval("/m", LmEvalConfig(tasks=["x"]), "cpu", tmp_path)
