"""What every evaluated model is asked: the test questions and the held-in probe.

Each prompt is rendered exactly as training rendered it, with the template stored with the model
(final/tunesmith_template.json) when there is one; each question keeps its reference answer, its numeric
`value` (for the probe's recall) and its training sample (for answer-token loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import Config, UserError
from tunesmith.data.formats import Example, Template, as_messages, prompt_key
from tunesmith.data.pipeline import Prepared
from tunesmith.data.render import render_prompt
from tunesmith.model.load import TEMPLATE_FILE, load_template


@dataclass
class Questions:
    """What every model is asked: prompt ids, the texts reports show, the samples for answer-token loss."""

    examples: list[Example]
    prompts: list[list[int]]
    prompt_texts: list[str]
    questions: list[str]
    references: list[str]
    values: list[float | None]  # the row's `value` field (earnings_calls.jsonl has one), else None
    samples: list[dict] = field(default_factory=list)


def reference_of(example: Example, template: Template) -> str:
    """The answer the example teaches (last assistant turn for chat)."""
    if example.messages is not None:
        return next(m["content"] for m in reversed(example.messages) if m["role"] == "assistant")
    return example.fields.get(template.response_field) or as_messages(example)[-1]["content"]


def value_of(example: Example) -> float | None:
    """The row's numeric `value` field when it has one (kept as a string by the data layer), else None."""
    raw = example.fields.get("value") if example.messages is None else None
    try:
        return float(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def questions_for(examples: list[Example], samples: list[dict], template: Template, tok) -> Questions:
    """Render each example's prompt exactly as training did; keep its training sample for the loss."""
    prompts = [render_prompt(ex, template, tok) for ex in examples]
    wanted = {ex.where for ex in examples}
    return Questions(
        examples=examples,
        prompts=prompts,
        prompt_texts=[tok.decode(p, skip_special_tokens=False) for p in prompts],
        questions=[prompt_key(ex) for ex in examples],
        references=[reference_of(ex, template) for ex in examples],
        values=[value_of(ex) for ex in examples],
        samples=[s for s in samples if s["where"] in wanted],
    )


def subset(qs: Questions, idx: Sequence[int]) -> Questions:
    """The questions at `idx`, in that order, with their training samples (eval.time_budget's chunks)."""
    examples = [qs.examples[i] for i in idx]
    wanted = {ex.where for ex in examples}
    return Questions(
        examples=examples,
        prompts=[qs.prompts[i] for i in idx],
        prompt_texts=[qs.prompt_texts[i] for i in idx],
        questions=[qs.questions[i] for i in idx],
        references=[qs.references[i] for i in idx],
        values=[qs.values[i] for i in idx],
        samples=[s for s in qs.samples if s["where"] in wanted],
    )


def eval_sets(cfg: Config, data: Prepared, template: Template, tok) -> tuple[Questions, Questions]:
    """(first eval.limit test examples, first eval.probe TRAINING examples); UserError when nothing to ask."""
    if template.format == "text":
        raise UserError(
            "data.format=text: raw text has no questions to answer "
            "(compare/eval need qa, alpaca or chat data)"
        )
    if not data.test_examples:
        raise UserError(
            f"{cfg.data.path}: no test examples to evaluate on (set data.test_size > 0 or data.test_path)"
        )
    test = data.test_examples[: cfg.eval.limit] if cfg.eval.limit else data.test_examples
    probe = data.train_examples[: cfg.eval.probe]
    return questions_for(test, data.test, template, tok), questions_for(probe, [], template, tok)


def stored_template(model_dir: Path) -> Template | None:
    """The template a model was trained with (final/tunesmith_template.json: {"template": ...}), or None."""
    if not (Path(model_dir) / TEMPLATE_FILE).is_file():
        return None
    spec = load_template(model_dir)
    return Template.from_dict(spec.get("template", spec))
