"""Config: YAML loading, dotted overrides, one-line errors with a way out, every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import Config, UserError, describe, load_config, parse_overrides, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def error(path=None, overrides=None) -> str:
    with pytest.raises(UserError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.data.format, cfg.data.on_bad_row, cfg.train.lr, cfg.lora) == ("qa", "fail", 1e-4, None)


def test_yaml_file_nested_sections(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            """
model: {name: some/model}
data:
  path: d.jsonl
  fields: {question: prompt, answer: completion}
  max_length: 256
train: {lr: 3.0e-4, betas: [0.8, 0.95]}
lora: {r: 8}
eval: {judge: {base_url: "http://x/v1", model: j}}
out_dir: runs/x
""",
        )
    )
    assert cfg.model.name == "some/model"
    assert cfg.data.fields == {"question": "prompt", "answer": "completion"}
    assert (cfg.data.max_length, cfg.train.lr, cfg.train.betas) == (256, 3e-4, (0.8, 0.95))
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32
    assert cfg.eval.judge.model == "j" and cfg.eval.judge.max_retries == 3
    assert cfg.out_dir == "runs/x"


def test_overrides_parse_as_yaml_scalars_lists_and_maps():
    assert parse_overrides(
        [
            "train.lr=1e-4",
            "data.max_length=256",
            "data.packing=false",
            "x.y.z=[1, 2]",
            "data.fields={question: prompt}",
            "data.test_path=null",
            "out_dir=",
        ]
    ) == {
        "train": {"lr": "1e-4"},  # YAML 1.1 reads 1e-4 (no dot) as a string; pydantic turns it into a float
        "data": {"max_length": 256, "packing": False, "fields": {"question": "prompt"}, "test_path": None},
        "x": {"y": {"z": [1, 2]}},
        "out_dir": "",
    }
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "train.betas=[0.8, 0.9]",
            "data.fields={question: prompt}",
            "eval.lm_eval.tasks=[hellaswag, arc_easy]",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.betas == (0.8, 0.9)
    assert cfg.data.fields == {"question": "prompt"}
    assert cfg.eval.lm_eval.tasks == ["hellaswag", "arc_easy"]


def test_overrides_win_over_file_and_merge_nested(tmp_path):
    p = write(tmp_path, "data: {path: a.jsonl, max_length: 128}\nlora: {r: 4}\n")
    cfg = load_config(p, ["data.max_length=64", "lora.alpha=8"])
    assert (cfg.data.path, cfg.data.max_length, cfg.lora.r, cfg.lora.alpha) == ("a.jsonl", 64, 4, 8)


def test_lora_true_means_defaults():
    assert load_config(None, ["lora=true"]).lora.r == 16
    assert load_config(None, ["lora.r=4"]).lora.r == 4


def test_unknown_key_suggests_the_close_one(tmp_path):
    assert (
        error(None, ["data.max_lenght=3"])
        == "config: unknown key 'data.max_lenght' — did you mean 'data.max_length'?"
    )
    assert error(write(tmp_path, "trian: {lr: 1}\n")).endswith("unknown key 'trian' — did you mean 'train'?")
    assert "see `tunesmith config show`" in error(None, ["data.zzzzzz=1"])


def test_unknown_key_suggestion_prefers_same_section_and_aliases():
    assert error(None, ["train.learning_rat=1"]).endswith("did you mean 'train.lr'?")
    assert error(None, ["train.learning_rate=1"]).endswith("did you mean 'train.lr'?")
    assert error(None, ["train.gradient_accumulation_steps=2"]).endswith("did you mean 'train.grad_accum'?")


def test_unknown_key_in_a_named_entry_suggests_within_that_entry(tmp_path):
    # eval.endpoints is a dict of EndpointConfig: the suggestion keeps the entry's name
    cfg = "eval:\n  endpoints:\n    gpt: {base_url: 'http://x/v1', model: m, retries: 2}\n"
    assert error(write(tmp_path, cfg)).endswith(
        "unknown key 'eval.endpoints.gpt.retries' — did you mean 'eval.endpoints.gpt.max_retries'?"
    )


def test_bad_values_name_key_and_value():
    assert error(None, ["train.lr=-0.001"]) == "config: train.lr: Input should be greater than 0 (got -0.001)"
    assert error(None, ["data.format=xml"]).startswith("config: data.format: Input should be 'qa', 'alpaca'")
    assert error(None, ["data.on_bad_row=ignore"]).endswith("(got 'ignore')")
    assert (
        error(None, ["data.test_size=2.5"])
        == "config: data.test_size: must be a fraction < 1 or a whole count (got 2.5)"
    )
    assert error(None, ["train.batch_size=abc"]).startswith(
        "config: train.batch_size: Input should be a valid integer"
    )


def test_file_errors(tmp_path):
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    assert error(write(tmp_path, "data:\n  path: [a\n")).startswith(
        f"{tmp_path / 'config.yaml'}:3: invalid YAML"
    )
    assert error(write(tmp_path, "- a\n- b\n")).endswith(
        "top level must be a mapping of sections (model, data, train, ...)"
    )
    assert error(None, ["train.lr"]) == "override 'train.lr' must look like key=value (e.g. train.lr=1e-4)"
    assert error(None, ["out_dir=x", "out_dir.y=1"]) == "override 'out_dir.y=1': 'out_dir' is not a section"


def test_save_and_describe_round_trip(tmp_path):
    cfg = load_config(None, ["lora.r=4", "data.fields={question: q}", "train.betas=[0.5, 0.6]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    rows = {k: (v, desc) for k, v, desc in describe(cfg)}
    assert rows["train.lr"] == (1e-4, "peak learning rate")
    assert rows["lora.r"][0] == 4
    assert all(desc for _, desc in rows.values())  # every field has a description


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    "bad", ["timeout_s=0", "max_retries=-1", "api_key_env=[a]", "base_url=null", "model=null"]
)
def test_judge_and_endpoints_validate_the_same_endpoint_fields(bad):
    def section(prefix: str, *more: str) -> list[str]:
        return [f"{prefix}.{kv}" for kv in ("base_url=http://x/v1", "model=m", *more)]

    # one shape: a bad base field is refused by both sections with the same message
    judge_error = error(None, section("eval.judge", bad)).replace("eval.judge", "SECTION")
    assert judge_error == error(None, section("eval.endpoints.x", bad)).replace("eval.endpoints.x", "SECTION")
    # and the defaults agree; each keeps only its own extra (judge: format_retries, endpoints: concurrency)
    judge = load_config(None, section("eval.judge")).eval.judge.model_dump()
    endpoint = load_config(None, section("eval.endpoints.x")).eval.endpoints["x"].model_dump()
    assert judge.pop("format_retries") is None and endpoint.pop("concurrency") == 4
    assert (
        judge
        == endpoint
        == {
            "base_url": "http://x/v1",
            "model": "m",
            "api_key_env": None,
            "timeout_s": 60.0,
            "max_retries": 3,
        }
    )
