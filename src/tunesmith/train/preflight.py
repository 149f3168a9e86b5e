"""Pre-flight: everything that would make a run train on garbage, checked before any weight moves.

`preflight(cfg, tokenizer, data, model_config) -> Report` needs the tokenizer, the built data and the model's
config only (no weights). Errors are problems no run should start with (the first is raised as one UserError);
warnings are printed one line each. `train`, `tunesmith data inspect` and `tunesmith plan` all run it through
`check`, so a config that would fail to train fails the same way when it is only inspected or planned.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from tunesmith.config import Config, UserError
from tunesmith.data.pipeline import Prepared, render_all
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE, encode_batch
from tunesmith.data.truncate import WARN_CUT_SHARE
from tunesmith.model.load import load_config_only
from tunesmith.model.loss import label_fraction
from tunesmith.plan.devices import calibrated_peak_flops
from tunesmith.runtime import device, fast_bf16, print0
from tunesmith.train.select import KNOWN
from tunesmith.train.track import missing_packages

ROUNDTRIP_SAMPLE = 200  # examples whose texts go through encode -> decode
ROUNDTRIP_ERROR_SHARE = 0.25  # more texts than this not surviving it: the tokenizer does not fit the data
# config keys that hold a model's context length, most common first (GPT-NeoX/Llama, GPT-2, others)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_NO_LIMIT = 1 << 30  # render without truncation to measure an example's full length
_CUT_SLACK = 8  # tokens a prompt_left cut may end short of max_length


@dataclass
class Report:
    """What pre-flight found: errors stop the run (most important first), warnings are printed."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_first(self) -> None:
        """Raise the first error as a one-line UserError (saying how many more there are)."""
        if self.errors:
            more = f" (and {len(self.errors) - 1} more pre-flight error(s))" if len(self.errors) > 1 else ""
            raise UserError(self.errors[0] + more)


def check(cfg: Config, tokenizer, data: Prepared, warn: Callable[[str], None] | None = None) -> Report:
    """preflight() with the model's config (read without weights): each warning printed, the first error
    raised."""
    report = preflight(cfg, tokenizer, data, load_config_only(cfg.model))
    for message in report.warnings:
        (warn or _warn_stderr)(f"warning: {message}")
    report.raise_first()
    return report


def _warn_stderr(message: str) -> None:
    print0(message, file=sys.stderr)  # stderr: `tunesmith plan --json` keeps stdout for the JSON


def preflight(cfg: Config, tokenizer, data: Prepared, model_config) -> Report:
    """Tokenizer vs model and data, labels, context, selection, truncation, precision: errors and warnings,
    nothing raised."""
    report = Report()
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    check_tokenizer(cfg, tokenizer, data, text, report)
    check_context(cfg, text, report)
    check_select(cfg, data, report)
    check_epochs(cfg, report)
    if data.train:  # a streamed corpus renders only its held-out file
        check_labels(cfg, data, report)
        check_roundtrip(cfg, tokenizer, data, report)
        check_truncation(cfg, tokenizer, data, report)
    dev = device()
    message = precision_warning(cfg.train.precision, dev.type, fast_bf16(dev), _measured_bf16_slowdown)
    if message:
        report.warnings.append(message)
    report.errors += missing_packages(cfg.train.report_to)  # a tracker that cannot log: before any step
    return report


def check_tokenizer(cfg: Config, tok, data: Prepared, model_config, report: Report) -> None:
    """EOS set and in the vocabulary; every id the run can feed (vocab, samples, pad) has an embedding row;
    chat template."""
    name = f"model.name '{cfg.model.name}'"
    if tok.eos_token_id is None:
        report.errors.append(
            f"{name}: the tokenizer has no eos_token, so answers could never end (set eos_token in its "
            "tokenizer_config.json)"
        )
    elif tok.eos_token not in tok.get_vocab():
        report.errors.append(
            f"{name}: the tokenizer's eos_token {tok.eos_token!r} is not in its vocabulary (fix eos_token in "
            "tokenizer_config.json)"
        )
    rows = getattr(model_config, "vocab_size", None)
    if rows and len(tok) > rows:
        specials = {k: getattr(tok, f"{k}_token_id") for k in ("eos", "pad", "bos")}
        past = ", ".join(f"{k} = id {v}" for k, v in specials.items() if v is not None and v >= rows)
        report.errors.append(
            f"{name}: the tokenizer has {len(tok)} tokens but the model's embedding has vocab_size={rows} "
            f"rows{f' ({past})' if past else ''}: ids >= {rows} have no embedding (use the tokenizer the "
            "model was trained with)"
        )
    elif rows:  # and the ids the run will really feed
        top, where = max(
            ((max(s["input_ids"], default=-1), s["where"]) for s in data.train + data.test), default=(-1, "")
        )
        if top >= rows:
            report.errors.append(
                f"{where}: token id {top} is past the {rows} embedding rows (vocab_size) of {name}"
            )
    if (cfg.data.template == "chat" or cfg.data.format == "chat") and not getattr(tok, "chat_template", None):
        report.errors.append(
            f"data.template=chat but the tokenizer of {name} has no chat_template (use data.template=qa or a "
            "template string)"
        )


def check_select(cfg: Config, data: Prepared, report: Report) -> None:
    """train.select names a metric the training eval computes; early stopping has evals to count."""
    tc = cfg.train
    if tc.select not in KNOWN:
        report.errors.append(
            f"train.select={tc.select!r}: not a metric the training eval computes (known: {', '.join(KNOWN)})"
        )
    elif tc.select.startswith("probe_") and (
        not cfg.eval.probe or cfg.data.format == "text" or not data.train
    ):
        report.errors.append(
            f"train.select={tc.select}: the probe asks eval.probe trained questions (now {cfg.eval.probe}) "
            "of qa, alpaca or chat data held in memory (set eval.probe, or train.select=eval_loss)"
        )
    elif tc.early_stop_patience and not data.test:
        report.errors.append(
            f"train.early_stop_patience={tc.early_stop_patience}: there is no held-out split to evaluate "
            "(set data.test_size or data.test_path, or train.early_stop_patience=0)"
        )
    elif tc.early_stop_patience and not tc.eval_every:
        report.warnings.append(
            f"train.early_stop_patience={tc.early_stop_patience} with train.eval_every=0: the final eval is "
            "the only one, so the run never stops early (set train.eval_every)"
        )


def check_epochs(cfg: Config, report: Report) -> None:
    """train.eval_every=epoch and data.limit=auto count passes over samples: a streamed corpus has none."""
    if cfg.data.streaming:
        for key, value in (("train.eval_every", cfg.train.eval_every), ("data.limit", cfg.data.limit)):
            if value in ("epoch", "auto"):
                report.errors.append(
                    f"{key}={value}: a streamed corpus (data.streaming=true) has no epochs or pairs to count "
                    f"(give {key} a number)"
                )


def model_context(model_config) -> int | None:
    """The model's context length from its config (max_position_embeddings or the config's equivalent), else
    None."""
    for key in _CONTEXT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(cfg: Config, model_config, report: Report) -> None:
    """data.max_length must not exceed the positions the model was trained for."""
    context = model_context(model_config)
    if context is not None and cfg.data.max_length > context:
        report.errors.append(
            f"data.max_length={cfg.data.max_length} exceeds the context of model.name '{cfg.model.name}' "
            f"({context} positions in its config.json; lower data.max_length to at most {context})"
        )


def check_labels(cfg: Config, data: Prepared, report: Report) -> None:
    """Every training example carries loss on at least one token, and some position predicts a label."""
    empty = [s["where"] for s in data.train if all(label == IGNORE for label in s["labels"])]
    if empty:
        report.errors.append(
            f"{empty[0]}: no token of this example carries loss ({len(empty)} of {len(data.train)} training "
            "examples like it; check data.template and data.truncation)"
        )
    elif label_fraction(data.train) == 0:
        report.errors.append(
            f"{cfg.data.path}: none of the {len(data.train)} training examples has a token to learn (each is "
            "a single token, e.g. a lone EOS: does the tokenizer encode this data to nothing?)"
        )


def check_roundtrip(cfg: Config, tok, data: Prepared, report: Report) -> None:
    """decode(encode(text)) == text on a sample of the data's texts, up to the tokenizer's own normalisation.

    What a tokenizer may legitimately change is its normaliser's work (NFC/NFKC, lowercasing, sentencepiece's
    spaces) and whitespace layout (WordPiece re-spaces punctuation). Characters it cannot represent (unknown
    to a vocabulary without byte fallback) come back as <unk> or not at all: the model never sees them. A few
    such texts are a warning; more than ROUNDTRIP_ERROR_SHARE of them, an error.
    """
    texts = _sample_texts(data.train_examples, ROUNDTRIP_SAMPLE)
    if not texts:
        return
    ids = encode_batch(tok, [t for _, t in texts], add_special_tokens=False)
    back = tok.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    normalizer = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    bad = [(where, t, b) for (where, t), b in zip(texts, back) if not _same_text(t, b, normalizer)]
    if not bad:
        return
    where, t, b = bad[0]
    share = len(bad) / len(texts)
    message = (
        f"model.name '{cfg.model.name}': the tokenizer does not reproduce {len(bad)} of {len(texts)} sampled "
        f"texts ({share:.0%}; first: {where}: {_clip(t)} -> {_clip(b)})"
    )
    if share > ROUNDTRIP_ERROR_SHARE:
        report.errors.append(message + ": it does not fit this data (wrong or broken tokenizer files?)")
    else:
        report.warnings.append(message + ": the characters it lost are invisible to the model")


def _sample_texts(examples: list, limit: int) -> list[tuple[str, str]]:
    """(place, text) of every non-blank field or message of up to `limit` examples spread over the split."""
    step = max(1, len(examples) // limit)
    out = []
    for ex in examples[::step][:limit]:
        items = (
            [(m.get("role", "message"), m.get("content")) for m in ex.messages]
            if ex.messages
            else ex.fields.items()
        )
        out += [(f"{ex.where} field '{k}'", v) for k, v in items if isinstance(v, str) and v.strip()]
    return out


def _same_text(text: str, decoded: str, normalizer) -> bool:
    if decoded == text:
        return True
    norm = normalizer.normalize_str if normalizer is not None else str
    # sentencepiece normalisers write spaces as U+2581; whitespace layout is normalisation, characters are not
    return "".join(norm(text).replace("\u2581", " ").split()) == "".join(
        norm(decoded).replace("\u2581", " ").split()
    )


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def check_truncation(cfg: Config, tok, data: Prepared, report: Report) -> None:
    """More than a few percent of training examples cut at data.max_length: how far it would have to grow."""
    d = cfg.data
    if d.format == "text":
        return  # a long document becomes consecutive blocks, nothing is cut
    # a cut sample ends at max_length or a few tokens short of it (prompt_left re-encodes the cut content, and
    # BPE merges across the cut), so only those samples need their full length measured
    full = {s["where"] for s in data.train if len(s["input_ids"]) >= d.max_length - _CUT_SLACK}
    examples = [ex for ex in data.train_examples if ex.where in full]
    lengths = [
        len(s["input_ids"])
        for s in render_all(examples, data.template, tok, _NO_LIMIT, d.truncation, Rejects("skip"))
    ]
    cut = [n for n in lengths if n > d.max_length]
    share = len(cut) / len(data.train)
    if share > WARN_CUT_SHARE:
        report.warnings.append(
            f"{len(cut)} of {len(data.train)} training examples ({share:.0%}) are cut at data.max_length="
            f"{d.max_length} (data.truncation={d.truncation}); data.max_length={max(cut)} "
            f"(+{max(cut) - d.max_length}) would keep them whole"
        )


def precision_warning(
    precision: str, device_type: str, native_bf16: bool, slowdown: Callable[[str], float]
) -> str | None:
    """A warning when train.precision=bf16 asks for bf16 where its matmuls are emulated (`slowdown`: measured
    fp32/bf16)."""
    if precision != "bf16" or native_bf16:
        return None
    if device_type != "cpu":
        return (
            f"train.precision=bf16: this {device_type} device has no native bf16 (use train.precision=auto)"
        )
    return (
        f"train.precision=bf16: this CPU has no native bf16 matmuls (no AVX512-BF16/AMX): bf16 autocast "
        f"measured {slowdown(device_type):.1f}x slower than fp32 here (train.precision=auto picks fp32 on "
        "this machine)"
    )


def _measured_bf16_slowdown(device_type: str) -> float:
    """fp32 / bf16-autocast Linear FLOP/s on this device, measured once per machine (the plan's calibration
    cache)."""
    return calibrated_peak_flops(device_type) / calibrated_peak_flops(device_type, bf16=True)
