"""serve.rag through a real uvicorn server and the official `openai` client: the model is asked with the
retrieved passages in its prompt, and the passages come back in `retrieval` (body, or a stream's first chunk).
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import tiny
from tests.test_openai_client import running_server
from tunesmith import cli
from tunesmith.config import Config, DataConfig, GenerateConfig, ModelConfig, ServeConfig, UserError
from tunesmith.config.schema import RagConfig
from tunesmith.data.formats import as_messages, get_template
from tunesmith.data.pipeline import build
from tunesmith.generate import generate, prompt_ids
from tunesmith.model.load import load_tokenizer
from tunesmith.retrieve.corpus import passages_from_pairs
from tunesmith.retrieve.embed import PACKAGED_EMBEDDER, packaged_model_dir
from tunesmith.retrieve.index import open_retriever
from tunesmith.retrieve.prompt import rag_messages
from tunesmith.serve.app import create_app
from tunesmith.serve.rag import ServeRag, open_serve_rag
from tunesmith.serve.scheduler import LoadedModel

openai = pytest.importorskip("openai")

PAIRS = [
    ("Where does the zorblax live?", "In the marshes."),
    ("Where does the quintara live?", "In the dunes."),
    ("Where does the velmoth live?", "In the caves."),
    ("Where does the drusk live?", "On the cliffs."),
]
IDS = [f"train:{i}" for i in range(len(PAIRS))]


def _mtimes(folder):
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("template", ["chat", "qa"])
def test_chat_answers_with_the_passages_and_returns_them(tmp_path, template):
    retriever = open_retriever(passages_from_pairs(PAIRS, IDS), "bm25", tmp_path / "idx", None)
    model, tok = tiny.llama(), tiny.tokenizer()
    model.generation_config.eos_token_id = None
    lm = LoadedModel("tiny", model, tok, get_template(template, template))
    cfg = Config(generate=GenerateConfig(max_new_tokens=6), serve=ServeConfig(max_wait_ms=5))
    app = create_app(cfg, {"tiny": lm}, rag=ServeRag(retriever, k=2))
    messages = [{"role": "user", "content": "Where does the drusk live?"}]
    hits = retriever.search(messages[0]["content"], 2)
    assert hits[0].passage.id == "train:3"  # the only passage naming the drusk
    with_context = prompt_ids(lm.template, tok, rag_messages(messages, hits))
    plain = prompt_ids(lm.template, tok, messages)
    want = generate(model, tok, [with_context], cfg.generate)[0]
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="tiny", messages=messages)
        got = chat.model_extra["retrieval"]
        assert [p["id"] for p in got] == [h.passage.id for h in hits] and [p["rank"] for p in got] == [1, 2]
        assert (
            got[0]["text"] == "Q: Where does the drusk live?\nA: On the cliffs."
            and got[0]["source"] == "train"
        )
        # the model was asked with the passages: the prompt is the RAG prompt, not the bare question
        assert chat.usage.prompt_tokens == len(with_context) > len(plain)
        assert chat.choices[0].message.content == want.text

        events = list(client.chat.completions.create(model="tiny", messages=messages, stream=True))
        assert [p["id"] for p in events[0].model_extra["retrieval"]] == [h.passage.id for h in hits]
        assert all("retrieval" not in (e.model_extra or {}) for e in events[1:])
        assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == want.text

        nothing = [{"role": "user", "content": "penguins?"}]  # shares no word with the corpus
        chat = client.chat.completions.create(model="tiny", messages=nothing)
        assert chat.model_extra["retrieval"] == []
        assert chat.usage.prompt_tokens == len(prompt_ids(lm.template, tok, nothing))  # question unchanged

        raw = client.completions.create(model="tiny", prompt="Where does the drusk live?", max_tokens=2)
        assert "retrieval" not in (raw.model_extra or {})  # raw text continuation is left as sent


def test_passages_that_do_not_fit_the_context_are_dropped_lowest_rank_first(tmp_path):
    long = [(f"Where does the drusk {i} live?", " ".join(["On the windy cliffs."] * 12)) for i in range(3)]
    retriever = open_retriever(passages_from_pairs(long, IDS[:3]), "bm25", tmp_path / "idx", None)
    model, tok = tiny.llama(), tiny.tokenizer()  # a 512-token context
    model.generation_config.eos_token_id = None
    lm = LoadedModel("tiny", model, tok, get_template("qa", "qa"))
    app = create_app(Config(serve=ServeConfig(max_wait_ms=5)), {"tiny": lm}, rag=ServeRag(retriever, k=3))
    messages = [{"role": "user", "content": "Where does the drusk 1 live?"}]
    hits = retriever.search(messages[0]["content"], 3)
    sizes = [len(prompt_ids(lm.template, tok, rag_messages(messages, hits[:n]))) for n in range(4)]
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3] and sizes[1] < 512
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # room for the prompt with the best passage only: the other two are left out
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=512 - sizes[1])
        assert [p["id"] for p in chat.model_extra["retrieval"]] == [hits[0].passage.id]
        assert chat.usage.prompt_tokens == sizes[1]
        # one token less: no passage fits, the question goes as sent
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=512 - sizes[1] + 1)
        assert chat.model_extra["retrieval"] == [] and chat.usage.prompt_tokens == sizes[0]


def _cfg(tmp_path, model_dir, qa_file, rag: RagConfig) -> Config:
    return Config(
        model=ModelConfig(name=str(model_dir)),
        data=DataConfig(path=str(qa_file), format="qa"),
        out_dir=str(tmp_path / "run"),
        serve=ServeConfig(rag=rag),
    )


def test_serve_rag_over_the_training_split_never_holds_a_test_pair(tmp_path, model_dir, qa_file):
    cfg = _cfg(tmp_path, model_dir, qa_file, RagConfig(corpus="train", retriever="bm25", k=3))
    rag = open_serve_rag(cfg)
    data = build(cfg, load_tokenizer(cfg.model), cfg.out_dir)
    assert len(data.test_examples) > 0 and len(rag.retriever.passages) == len(data.train_examples)
    texts = {p.text for p in rag.retriever.passages}
    for ex in data.train_examples:
        q, a = (m["content"] for m in as_messages(ex))
        assert f"Q: {q}\nA: {a}" in texts
    for ex in data.test_examples:
        q, a = (m["content"] for m in as_messages(ex))
        assert f"Q: {q}\nA: {a}" not in texts
        hits = rag.retriever.search(q, 3)
        assert all(h.passage.id.startswith("train:") and q not in h.passage.text for h in hits)
    # persisted in <out_dir>/retrieval: the next start loads it
    index = tmp_path / "run" / "retrieval"
    before = _mtimes(index)
    assert (index / "meta.json").is_file() and open_serve_rag(
        cfg
    ).retriever.passages == rag.retriever.passages
    assert _mtimes(index) == before


@pytest.mark.skipif(packaged_model_dir() is None, reason=f"{PACKAGED_EMBEDDER} not installed")
def test_serve_rag_hybrid_over_documents(tmp_path, model_dir, qa_file):
    docs = tmp_path / "docs"
    docs.mkdir()
    for q, a in PAIRS:
        name = q.split()[3].rstrip("?")
        (docs / f"{name}.md").write_text(f"# The {name}\n\nThe {name} lives {a[0].lower()}{a[1:]}\n")
    rag_cfg = RagConfig(corpus=str(docs), retriever="hybrid", k=2, embedding_model=PACKAGED_EMBEDDER)
    rag = open_serve_rag(_cfg(tmp_path, model_dir, qa_file, rag_cfg))
    assert sorted(p.id for p in rag.retriever.passages) == sorted(
        f"docs/{n}.md#0" for n in ("zorblax", "quintara", "velmoth", "drusk")
    )
    hits = rag.search([{"role": "user", "content": "Where does the velmoth live?"}])
    assert hits[0].passage.id == "docs/velmoth.md#0" and len(hits) == 2
    messages = rag_messages([{"role": "user", "content": "Where does the velmoth live?"}], hits)
    assert (
        messages[0]["content"].startswith("Use the context")
        and "The velmoth lives in the caves." in messages[0]["content"]
    )


def test_an_index_shipped_without_its_corpus_is_served_as_built(tmp_path, model_dir, qa_file, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "drusk.md").write_text("# Drusk\n\nThe drusk lives on the cliffs.\n")
    cfg = _cfg(tmp_path, model_dir, qa_file, RagConfig(corpus=str(docs), retriever="bm25", k=1))
    built = open_serve_rag(cfg).retriever.passages
    (docs / "drusk.md").unlink()
    docs.rmdir()
    capsys.readouterr()
    assert open_serve_rag(cfg).retriever.passages == built
    assert f"{docs}: no such file or folder; serving the index in" in capsys.readouterr().out
    # an index of another retriever is not what was asked for: the corpus error stands
    dense = cfg.model_copy(update={"serve": ServeConfig(rag=RagConfig(corpus=str(docs), retriever="dense"))})
    with pytest.raises(UserError, match="no such file or folder"):
        open_serve_rag(dense)


def test_cli_serve_with_a_missing_corpus_is_one_line_exit_2(tmp_path, monkeypatch, capsys, model_dir):
    capsys.readouterr()
    missing = tmp_path / "no-docs"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serve: {rag: {retriever: bm25}}\n")
    argv = ["tunesmith", "serve", str(cfg), f"model.name={model_dir}", f"serve.rag.corpus={missing}"]
    monkeypatch.setattr(sys, "argv", [*argv, f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {missing}: no such file or folder")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run" / "retrieval").exists()


def test_playground_shows_the_retrieved_passages_under_each_answer(tmp_path):
    from tests.test_playground_browser import ARGS, CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium; CI installs it in .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    retriever = open_retriever(passages_from_pairs(PAIRS, IDS), "bm25", tmp_path / "idx", None)
    tok, template = tiny.tokenizer(), get_template("qa", "qa")
    models = {n: LoadedModel(n, tiny.gpt_neox(seed=s), tok, template) for n, s in (("base", 0), ("tuned", 1))}
    cfg = Config(generate=GenerateConfig(max_new_tokens=4), serve=ServeConfig(max_wait_ms=5))
    app = create_app(cfg, models, rag=ServeRag(retriever, k=2))
    with running_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#question", "Where does the velmoth live?")
            page.click("#send")
            for side in ("left", "right"):
                page.wait_for_function(
                    f"document.getElementById('{side}-stat').textContent.includes('tokens/s')", timeout=30_000
                )
                shown = page.inner_text(f"#{side}-passages")
                assert shown.startswith("2 retrieved passages")
                assert "Q: Where does the velmoth live?\nA: In the caves." in shown and "train:2" in shown
                assert page.locator(f"#{side}-passages li").count() == 2
        finally:
            browser.close()
