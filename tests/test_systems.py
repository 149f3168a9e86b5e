"""`compare` over every kind of system: few-shot and RAG prompts, endpoints on a live server, the verdict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import tiny
from tunesmith.config import UserError, load_config
from tunesmith.data.pipeline import build
from tunesmith.eval.addons import prepare_addons
from tunesmith.eval.compare import compare
from tunesmith.eval.questions import eval_sets
from tunesmith.eval.systems import Addons, System, answer_local, percentile, system_prompts, systems_of
from tunesmith.eval.verdict import pairwise, verdict
from tunesmith.model.load import load_tokenizer

LINUX_RSS = Path("/proc/self/clear_refs").exists()  # where a CPU system's peak memory is measured
NAMES = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "juniper"]
# Training answers say TRAIN<i>; test answers say ZEBRA-<j>, a string that is nowhere in the training split.
TRAIN = [
    {"question": f"What is the code name of project {n}?", "answer": f"Project {n} is TRAIN{i}."}
    for i, n in enumerate(NAMES)
]
TEST = [
    {"question": f"Which team owns the {n} service?", "answer": f"Team ZEBRA-{40 + j} owns it."}
    for j, n in enumerate(NAMES[:4])
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("systems")
    model_dir = tiny.save_model_dir(root / "tiny-llama", arch="llama")
    return root, model_dir, write_jsonl(root / "train.jsonl", TRAIN), write_jsonl(root / "test.jsonl", TEST)


def cfg_for(files, out: str, *over: str):
    root, model_dir, train, test = files
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={train}",
            f"data.test_path={test}",
            "data.max_length=96",
            f"out_dir={root / out}",
            "eval.limit=4",
            "eval.probe=3",
            "eval.max_new_tokens=4",
            "eval.batch_size=4",
            "eval.embedding_model=null",
            "eval.rag.retriever=bm25",
            "eval.rag.k=2",
            "eval.fewshot.k=3",
            *over,
        ],
    )


def prompts_of(cfg, *names: str) -> dict[str, tuple[list[str], list[str]]]:
    """{system: (decoded test prompts, decoded probe prompts)}, built exactly as compare builds them."""
    tok = load_tokenizer(cfg.model)
    run = Path(cfg.out_dir)
    data = build(cfg, tok, run)
    test, probe = eval_sets(cfg, data, data.template, tok)
    systems = [s for s in systems_of(cfg) if s.name in names]
    addons, _ = prepare_addons(cfg, data, test, probe, systems, tok, run, None)
    out = {}
    for s in systems:
        t, _ = system_prompts(s, test, addons, False, data.template, tok, None)
        p, _ = system_prompts(s, probe, addons, True, data.template, tok, None)
        out[s.name] = ([tok.decode(x) for x in t], [tok.decode(x) for x in p])
    return out


@pytest.mark.parametrize("template", ["chat", "qa"])
def test_fewshot_prompts_hold_exactly_k_training_pairs_and_never_a_test_pair(files, template):
    cfg = cfg_for(files, f"fs-{template}", f"data.template={template}", "eval.systems=[base,base+fewshot]")
    got = prompts_of(cfg, "base", "base+fewshot")
    plain_test, plain_probe = got["base"]
    test, probe = got["base+fewshot"]
    for i, prompt in enumerate(test):
        assert prompt.count("TRAIN") == 3  # k = 3 training answers, each shown once
        assert "ZEBRA" not in prompt  # no test answer, not even another question's
        assert sum(t["question"] in prompt for t in TEST) == 1  # the question asked, no other test question
        assert prompt.endswith(plain_test[i][-40:])  # the question is asked as in training, after the shots
        # each shot is a whole rendered training pair: its question right before its answer
        turns = prompt.count("<|im_start|>assistant") if template == "chat" else prompt.count("### Answer:")
        assert turns == 4  # 3 answered shots + the open turn of the question
    assert len({p[: p.index(TEST[0]["question"][:9])] for p in test}) == 1
    for i, prompt in enumerate(probe):  # a probe question is training pair i: never its own answer
        assert f"TRAIN{i}." not in prompt and prompt.count("TRAIN") == 3
        assert prompt.endswith(plain_probe[i][-40:])


def test_nearest_fewshot_needs_an_embedder_and_says_so(files):
    cfg = cfg_for(files, "fs-near", "eval.systems=[base+fewshot]", "eval.fewshot.select=nearest")
    with pytest.raises(UserError, match="eval.fewshot.select=nearest"):
        prompts_of(cfg, "base+fewshot")


def test_rag_prompts_come_from_the_configured_corpus_only(files):
    root = files[0]
    cfg = cfg_for(files, "rag", "data.template=chat", "eval.systems=[base+rag]")
    test, probe = prompts_of(cfg, "base+rag")["base+rag"]
    for prompt in test + probe:
        assert "ZEBRA" not in prompt  # the planted test answers are outside the corpus: never retrieved
        assert (
            1 <= prompt.count("TRAIN") <= 2
        )  # at most k = 2 passages (BM25 drops zero scores), all training
    for i, prompt in enumerate(probe):  # a probe question finds its own training pair first
        assert f"[1] Q: {TRAIN[i]['question']}\nA: {TRAIN[i]['answer']}" in prompt
    # eval and serve take one path: the same section served loads eval's index (same passages), no rebuild
    from tunesmith.retrieve.rag import open_rag

    meta = root / "rag" / "retrieval" / "meta.json"
    built = meta.stat().st_mtime_ns
    served = open_rag(cfg, cfg.eval.rag, load_tokenizer(cfg.model), "serve.rag")
    assert meta.stat().st_mtime_ns == built and len(served.passages) == len(TRAIN)
    # a folder of documents as the corpus: passages from it, and nothing from the training pairs
    docs = root / "docs"
    docs.mkdir()
    (docs / "handbook.md").write_text("# Services\n\nThe amber service belongs to team SQUIRREL.\n")
    cfg = cfg_for(
        files, "rag-docs", "data.template=chat", "eval.systems=[base+rag]", f"eval.rag.corpus={docs}"
    )
    test, _ = prompts_of(cfg, "base+rag")["base+rag"]
    assert all("SQUIRREL" in p and "TRAIN" not in p for p in test)
    assert (root / "rag-docs" / "retrieval").is_dir()  # the index persists in the run dir


@pytest.fixture(scope="module")
def five(files):
    """A tiny trained run compared as base, base+fewshot, base+rag, tuned, tuned+rag."""
    from tunesmith.train.loop import train

    systems = "eval.systems=[base,base+fewshot,base+rag,tuned,tuned+rag]"
    cfg = cfg_for(files, "five", "data.template=chat", systems, "train.max_steps=4", "train.batch_size=4")
    train(cfg)
    return cfg, compare(cfg)


def test_metrics_json_has_every_system_and_its_costs(five):
    cfg, metrics = five
    names = ["base", "base+fewshot", "base+rag", "tuned", "tuned+rag"]
    ev = Path(cfg.out_dir) / "eval"
    assert json.loads((ev / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["systems"] == names and {"delta", "pairwise", "verdict", "notes"} <= set(metrics)
    for name in names:
        m = metrics[name]
        assert m["n"] == 4 and m["probe_n"] == 3
        assert m["prompt_tokens"] > 0 and m["latency_p95_s"] >= m["latency_p50_s"] > 0
        assert ("loss" in m) == (name in ("base", "tuned"))  # loss only for the training prompt
        assert ("retrieval_recall" in m) == name.endswith("+rag")
        assert ("train_seconds" in m) == name.startswith("tuned")
        if LINUX_RSS:  # measured on CPU too: the peak RSS above the RSS at the system's start, which for
            # a 44k-parameter model can be 0 (its answers fit in pages the allocator already holds)
            assert m["peak_memory_gb"] >= 0
    # shots and passages make longer prompts; the two RAG systems see the same passages
    assert metrics["base+fewshot"]["prompt_tokens"] > metrics["base"]["prompt_tokens"]
    assert metrics["base+rag"]["prompt_tokens"] == metrics["tuned+rag"]["prompt_tokens"]
    assert metrics["base+rag"]["retrieval_recall"] == 1.0  # each probe question retrieves its own pair
    assert len(metrics["pairwise"]["pairs"]) == 10  # every pair of 5 systems once
    for p in metrics["pairwise"]["pairs"].values():
        assert p["wins"] + p["losses"] + p["ties"] == 4
    rows = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert all(set(names) <= set(r) for r in rows)
    html = (ev / "report.html").read_text()
    assert html.index('class="verdict"') < html.index("<h2>Summary</h2>") < html.index("Every metric")
    assert all(n in html for n in names) and html.count("<img") == 4  # grouped charts, not one per metric


def test_cpu_peak_memory_counts_what_a_system_holds_while_answering_only(files, monkeypatch):
    import torch

    from tunesmith.eval import systems
    from tunesmith.model.load import load_model

    if not LINUX_RSS:
        pytest.skip("peak RSS reset needs Linux /proc/self/clear_refs")
    cfg = cfg_for(files, "rss", "data.template=chat", "eval.probe=0")
    tok = load_tokenizer(cfg.model)
    data = build(cfg, tok, Path(cfg.out_dir))
    test, probe = eval_sets(cfg, data, data.template, tok)
    model = load_model(cfg.model, torch.device("cpu")).eval()
    real = systems.timed_generate

    def holding_200_mib(model, tok, prompts, gen, progress=False):
        held = torch.ones(50 * 2**20)  # 200 MiB of float32, touched, held while the system answers
        out = real(model, tok, prompts, gen, progress)
        del held
        return out

    monkeypatch.setattr(systems, "timed_generate", holding_200_mib)
    before = torch.ones(100 * 2**20)  # a 400 MiB peak before the system starts: not its memory
    del before
    got = answer_local(model, tok, System("base", "base"), test, probe, Addons(), cfg, data.template)
    # 200 MiB = 209.7 MB held: at least 200 MB (pages freed in the window, e.g. by gc, may offset a little;
    # measured 199.96 MiB after other tests), and the 400 MiB peak before the reset does not count
    assert 200e6 <= got.peak_memory_bytes < 300 * 2**20


def test_verdict_names_the_winner_the_numbers_imply():
    def system(f1, recall, tokens):
        return {"token_f1": f1, "probe_numeric_recall": recall, "prompt_tokens": tokens, "latency_p50_s": 0.1}

    metrics = {
        "systems": ["base", "base+rag", "tuned", "tuned+rag"],
        "base": system(0.20, 0.10, 40),
        "base+rag": system(0.35, 0.90, 200),
        "tuned": system(0.40, 0.80, 40),
        "tuned+rag": system(0.55, 0.95, 200),
    }
    metrics["tuned"]["train_seconds"] = 120.0
    text = verdict(metrics)
    assert text.startswith("On held-out questions tuned+rag answers best (token F1 0.55")
    assert "tuned+rag recalls the most trained numbers (95%)" in text
    assert "the best without training is base+rag (90%)" in text
    assert "Cheapest to ask: base (40 prompt tokens" in text and "2.0 min of training" in text
    assert "RAG and fine-tuning combine" in text
    metrics["tuned+rag"]["token_f1"] = 0.30  # now worse than tuned alone
    text = verdict(metrics)
    assert "tuned answers best" in text and "do not combine here" in text and "does not beat tuned" in text


def test_pairwise_counts_wins_per_question():
    def row(a, b):
        return {"x": {"metrics": {"rouge_l": a}}, "y": {"metrics": {"rouge_l": b}}}

    got = pairwise([row(0.1, 0.5), row(0.5, 0.5), row(0.9, 0.2)], [], ["x", "y"])
    assert got == {"metric": "rouge_l", "pairs": {"y vs x": {"wins": 1, "losses": 1, "ties": 1}}}
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 95) == pytest.approx(1.95)


def test_endpoint_system_through_a_live_server_answers_like_the_local_model(files):
    pytest.importorskip("openai")
    from tests.test_openai_client import running_server
    from tunesmith.config import Config
    from tunesmith.data.formats import get_template
    from tunesmith.model.load import load_model
    from tunesmith.runtime import device
    from tunesmith.serve.app import create_app
    from tunesmith.serve.scheduler import LoadedModel

    cfg0 = cfg_for(files, "ep", "data.template=chat")
    model = load_model(cfg0.model, device()).eval()
    lm = LoadedModel("tiny", model, load_tokenizer(cfg0.model), get_template("chat", "chat"))
    with running_server(create_app(Config(), {"tiny": lm})) as url:
        cfg = cfg_for(
            files,
            "ep",
            "data.template=chat",
            "eval.systems=[base,endpoint:local,endpoint:local+rag]",
            f"eval.endpoints={{local: {{base_url: '{url}/v1', model: tiny}}}}",
        )
        metrics = compare(cfg)
    rows = [
        json.loads(x) for x in (Path(cfg.out_dir) / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    # the same greedy model behind the real openai client: the same answers as asked locally
    assert [r["endpoint:local"]["answer"] for r in rows] == [r["base"]["answer"] for r in rows]
    assert metrics["endpoint:local"]["prompt_tokens"] == metrics["base"]["prompt_tokens"]  # server's usage
    assert metrics["endpoint:local+rag"]["prompt_tokens"] > metrics["endpoint:local"]["prompt_tokens"]
    assert "loss" not in metrics["endpoint:local"] and metrics["endpoint:local"]["latency_p50_s"] > 0


def test_bad_system_config_is_one_line_exit_2(files, tmp_path, monkeypatch, capsys):
    from tunesmith import cli

    _, model_dir, train, _ = files
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"model: {{name: {model_dir}}}\ndata: {{path: {train}}}\nout_dir: {tmp_path}\n")
    for bad in ("eval.systems=[base,tuned+magic]", "eval.systems=[endpoint:nowhere]"):
        monkeypatch.setattr(sys, "argv", ["tunesmith", "compare", str(cfg_path), bad])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "system" in err[0]
    # a tuned system without a trained model: one line naming the way out (base systems need none)
    cfg = cfg_for(files, "untrained", "eval.systems=[base,tuned]")
    with pytest.raises(UserError, match="tunesmith train"):
        compare(cfg)
    assert System("x", "endpoint:a", rag=True).local is False
