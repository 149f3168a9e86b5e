"""Pre-flight: each check on a real bad input (a model dir, a tokenizer, data) before any weight moves."""

import json
import string
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests import tiny
from tunesmith import cli
from tunesmith.config import UserError, load_config
from tunesmith.data.formats import get_template
from tunesmith.data.pipeline import Prepared, build, render_all
from tunesmith.data.rejects import Rejects
from tunesmith.data.render import IGNORE
from tunesmith.model.load import load_config_only, load_tokenizer
from tunesmith.train import preflight as pf


def run(monkeypatch, capsys, *argv):
    capsys.readouterr()  # drop what building the fixtures printed
    monkeypatch.setattr(sys, "argv", ["tunesmith", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def cli_args(tmp_path, model_dir, data, *over):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {format: qa}\n")
    return [
        str(cfg),
        f"model.name={model_dir}",
        f"data.path={data}",
        f"out_dir={tmp_path / 'run'}",
        "data.test_size=4",
        "data.max_length=64",
        "train.max_steps=1",
        *over,
    ]


def checked(cfg, tok=None):
    """(report, data) of pre-flight on `cfg` as train would run it."""
    tok = tok or load_tokenizer(cfg.model)
    data = build(cfg, tok, None)
    return pf.preflight(cfg, tok, data, load_config_only(cfg.model)), data


def cfg_for(tmp_path, model_dir, data, *over):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={data}",
            "data.test_size=4",
            "data.max_length=64",
            f"out_dir={tmp_path / 'run'}",
            *over,
        ],
    )


def test_model_dir_without_tokenizer_stops_train_in_one_line(tmp_path, monkeypatch, capsys, qa_file):
    model_dir = tmp_path / "weights-only"
    tiny.gpt_neox().save_pretrained(model_dir)  # config.json + model.safetensors, no tokenizer files
    code, _, err = run(monkeypatch, capsys, "train", *cli_args(tmp_path, model_dir, qa_file))
    assert code == 2, err  # before the fix: an empty tokenizer, every example a lone EOS, and exit 0
    assert err.startswith(f"error: {model_dir}: no tokenizer files") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "final").exists()


def test_good_model_and_data_pass_clean(tmp_path, model_dir, qa_file):
    report, _ = checked(cfg_for(tmp_path, model_dir, qa_file, "train.precision=fp32"))
    assert report.errors == [] and report.warnings == []


def test_tokenizer_larger_than_the_embedding_fails_inspect_and_plan(tmp_path, monkeypatch, capsys, qa_file):
    # tokenizer.json without tokenizer_config.json: transformers adds the model type's default specials
    # (<|endoftext|>, <|padding|>) as NEW ids 400 and 401, past the 400 embedding rows; EOS is one of them
    model_dir = tmp_path / "tok-json-only"
    tiny.gpt_neox().save_pretrained(model_dir)
    Tokenizer.from_str(tiny._tokenizer_json()).save(str(model_dir / "tokenizer.json"))
    tok = load_tokenizer(load_config(None, [f"model.name={model_dir}"]).model)
    assert len(tok) == 402 and tok.eos_token_id == 400
    for command in (["data", "inspect"], ["plan"]):
        code, _, err = run(monkeypatch, capsys, *command, *cli_args(tmp_path, model_dir, qa_file))
        assert code == 2, (command, err)
        assert (
            "the tokenizer has 402 tokens but the model's embedding has vocab_size=400 rows (eos = id 400"
            in err
        )
        assert len(err.strip().splitlines()) == 1


def test_max_length_beyond_the_context_fails(tmp_path, monkeypatch, capsys, model_dir, qa_file):
    code, _, err = run(
        monkeypatch,
        capsys,
        "data",
        "inspect",
        *cli_args(tmp_path, model_dir, qa_file, "data.max_length=1024"),
    )
    assert code == 2
    assert (
        "data.max_length=1024 exceeds the context" in err and "at most 512" in err
    )  # tiny models: 512 positions


def test_chat_template_missing_is_an_error(tmp_path, model_dir, qa_file):
    tok = tiny.tokenizer()
    tok.chat_template = None
    data = build(cfg_for(tmp_path, model_dir, qa_file), tok, None)  # rendered with the qa template
    chat = cfg_for(tmp_path, model_dir, qa_file, "data.template=chat")
    report = pf.preflight(chat, tok, data, load_config_only(chat.model))
    assert any("data.template=chat but the tokenizer" in e and "no chat_template" in e for e in report.errors)


def test_examples_without_label_tokens_are_an_error(tmp_path, model_dir, qa_file):
    cfg = cfg_for(tmp_path, model_dir, qa_file)
    report, data = checked(cfg)
    assert report.errors == []
    data.train[3]["labels"] = [IGNORE] * len(
        data.train[3]["labels"]
    )  # e.g. a sample whose answer was masked too
    report = pf.preflight(cfg, tiny.tokenizer(), data, load_config_only(cfg.model))
    assert report.errors[0].startswith(
        f"{data.train[3]['where']}: no token of this example carries loss (1 of "
    )


def ascii_tokenizer(unk: bool) -> PreTrainedTokenizerFast:
    """A WordPiece-like BPE (whitespace pre-tokenizer, no byte fallback) that knows printable ASCII only."""
    tk = Tokenizer(models.BPE(unk_token="<unk>" if unk else None))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tk.train_from_iterator(tiny.CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>" if unk else None
    )


def test_text_the_tokenizer_cannot_encode_leaves_nothing_to_learn(tmp_path, model_dir):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": "日本語の文書 " * (i + 1)}) + "\n" for i in range(12)))
    cfg = cfg_for(tmp_path, model_dir, data, "data.format=text")
    report, prepared = checked(
        cfg, ascii_tokenizer(unk=False)
    )  # unknown characters are dropped: each doc is [EOS]
    assert all(len(s["input_ids"]) == 1 for s in prepared.train)
    assert report.errors[0].startswith(f"{data}: none of the 8 training examples has a token to learn")
    assert any("does not reproduce 8 of 8 sampled texts" in e for e in report.errors)  # the round trip agrees


def test_roundtrip_few_lost_characters_warn_many_fail(tmp_path, model_dir):
    rows = [
        {"question": f"What was the revenue in Q{i}?", "answer": f"The revenue was {i} million."}
        for i in range(40)
    ]
    rows[0]["answer"] = "The revenue was ¥34 million."  # one character the vocabulary lacks: <unk>
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = ascii_tokenizer(unk=True)
    report, _ = checked(cfg_for(tmp_path, model_dir, data, "data.test_size=0"), tok)
    assert report.errors == []
    (warning,) = [w for w in report.warnings if "does not reproduce" in w]
    assert (
        f"1 of 80 sampled texts (1%; first: {data}:1 field 'answer': 'The revenue was ¥34 million.' -> "
        in warning
    )
    data.write_text("".join(json.dumps({**r, "answer": r["answer"] + " ¥"}) + "\n" for r in rows))
    report, _ = checked(
        cfg_for(tmp_path, model_dir, data, "data.test_size=0", f"out_dir={tmp_path / 'b'}"), tok
    )
    assert any("does not reproduce 40 of 80 sampled texts (50%" in e for e in report.errors)


def test_truncation_warning_says_how_far_max_length_must_grow(tmp_path, model_dir, qa_file):
    cfg = cfg_for(tmp_path, model_dir, qa_file, "data.max_length=20")
    report, data = checked(cfg)
    full = render_all(
        data.train_examples, data.template, tiny.tokenizer(), 1 << 20, "prompt_left", Rejects("skip")
    )
    longest = max(len(s["input_ids"]) for s in full)
    cut = sum(len(s["input_ids"]) > 20 for s in full)
    assert cut > 0.03 * len(data.train) and longest > 20
    (warning,) = [w for w in report.warnings if "are cut at" in w]
    assert warning.startswith(f"{cut} of {len(data.train)} training examples")
    assert f"data.max_length={longest} (+{longest - 20}) would keep them whole" in warning
    report, _ = checked(
        cfg_for(tmp_path, model_dir, qa_file, f"data.max_length={longest}", f"out_dir={tmp_path / 'b'}")
    )
    assert not [w for w in report.warnings if "are cut at" in w]


def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_measured_factor():
    slow = pf.precision_warning("bf16", "cpu", native_bf16=False, slowdown=lambda dev: 103.0 / 13.6)
    assert "bf16 autocast measured 7.6x slower than fp32 here" in slow and "train.precision=auto" in slow

    def never(dev):
        raise AssertionError("measured where no warning is due")

    assert pf.precision_warning("bf16", "cpu", native_bf16=True, slowdown=never) is None
    assert pf.precision_warning("auto", "cpu", native_bf16=False, slowdown=never) is None
    assert pf.precision_warning("fp32", "cpu", native_bf16=False, slowdown=never) is None


def test_preflight_measures_the_bf16_factor_on_an_emulating_cpu(tmp_path, model_dir, qa_file, monkeypatch):
    speeds = {
        False: 103e9,
        True: 13.6e9,
    }  # fp32 Linear vs bf16-autocast Linear on an AVX2-only CPU (issue 16)
    monkeypatch.setattr(pf, "fast_bf16", lambda dev: False)
    monkeypatch.setattr(pf, "calibrated_peak_flops", lambda dev, bf16=False: speeds[bf16])
    report, _ = checked(cfg_for(tmp_path, model_dir, qa_file, "train.precision=bf16"))
    assert report.errors == [] and any("measured 7.6x slower than fp32" in w for w in report.warnings)


def test_report_raises_the_first_error_as_one_line():
    report = pf.Report(errors=["a.jsonl:3: first", "second"], warnings=["w"])
    with pytest.raises(UserError, match=r"^a\.jsonl:3: first \(and 1 more pre-flight error\(s\)\)$"):
        report.raise_first()
    pf.Report(warnings=["w"]).raise_first()  # warnings alone do not stop a run


def test_streamed_corpus_checks_only_what_it_has(tmp_path, model_dir):
    cfg = cfg_for(tmp_path, model_dir, "unused.jsonl")
    empty = Prepared([], [], [], [], get_template("qa", "qa"), 0, "", "")
    report = pf.preflight(cfg, tiny.tokenizer(), empty, load_config_only(cfg.model))
    assert report.errors == []


def test_plan_json_keeps_stdout_for_json_and_warns_on_stderr(
    tmp_path, monkeypatch, capsys, model_dir, qa_file
):
    code, out, err = run(
        monkeypatch, capsys, "plan", "--json", *cli_args(tmp_path, model_dir, qa_file, "data.max_length=20")
    )
    assert code in (0, None), err
    assert json.loads(out)["run"]["seq_len"] == 20
    assert [line for line in err.splitlines() if "are cut at data.max_length=20" in line][0].startswith(
        "warning: "
    )
