"""Streaming text: rows and positions, resume at the exact document, mixing, file kinds, memory (1 GB)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests import tiny
from tunesmith.config import DataConfig, SourceConfig, UserError, load_config
from tunesmith.data import stream_sources
from tunesmith.data.locate import stream_files
from tunesmith.data.stream import TextStream, uniform

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]


def word_tok() -> PreTrainedTokenizerFast:
    """One token per word: <eos>=0, <unk>=1, a=2, b=3, ... j=11 (hand-computable ids)."""
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")


def write_jsonl(path: Path, texts: list[str], opener=open) -> Path:
    with opener(path, "wb") as f:
        for t in texts:
            f.write((json.dumps({"text": t}) + "\n").encode())
    return path


def cfg_for(path: str | None = None, sources: list[tuple[str, float]] | None = None, **over) -> DataConfig:
    src = [SourceConfig(path=p, weight=w) for p, w in sources] if sources else None
    return DataConfig(path=path or "unused", format="text", streaming=True, sources=src, **over)


def test_packed_rows_restart_positions_at_each_document(tmp_path):
    # docs "a b c", "d e", "f g h i" -> ids [2 3 4 0] [5 6 0] [7 8 9 10 0] (0 = EOS), rows of 4 tokens
    f = write_jsonl(tmp_path / "d.jsonl", ["a b c", "d e", "f g h i"])
    s = TextStream(cfg_for(str(f), max_length=4), word_tok(), batch_size=3, seed=0)
    batch, wheres = s.next()
    assert batch["input_ids"].tolist() == [[2, 3, 4, 0], [5, 6, 0, 7], [8, 9, 10, 0]]
    # row 2: doc 2 at 0,1,2 then doc 3 restarts at 0; row 3 continues doc 3 from a new row start (0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["real_tokens"].item() == 12
    assert wheres == [f"{f}:1", f"{f}:2", f"{f}:3"]
    # the source starts over after its last document (epoch 1)
    assert s.next()[0]["input_ids"][0].tolist() == [2, 3, 4, 0]
    assert s.epoch == 1


def test_unpacked_rows_are_contiguous_blocks(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["a b c", "d e", "f g h i"])
    s = TextStream(cfg_for(str(f), max_length=4, packing=False), word_tok(), batch_size=2, seed=0)
    batch, _ = s.next()
    assert batch["input_ids"].tolist() == [[2, 3, 4, 0], [5, 6, 0, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_documents_in_a_packed_row_do_not_attend_to_each_other(tmp_path):
    tok = tiny.tokenizer()
    docs = ["The quick brown fox jumps over the lazy dog.", "What was the revenue of Acme in Q3 2020?"]
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    s = TextStream(cfg_for(str(f), max_length=48), tok, batch_size=1, seed=0)
    batch, _ = s.next()
    model = tiny.llama()
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        second = tok(docs[1])["input_ids"] + [tok.eos_token_id]
        start = len(tok(docs[0])["input_ids"]) + 1
        assert batch["position_ids"][0, start].item() == 0
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[start : start + len(second)], alone, atol=1e-5, rtol=1e-5)


def _batches(s: TextStream, n: int) -> list[torch.Tensor]:
    out = []
    for _ in range(n):
        b, _ = s.next()
        out.append(torch.cat([b["input_ids"], b["position_ids"]]))
    return out


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_resume_continues_at_the_exact_document(tmp_path, k):
    # two sources of uneven documents, rows that cut documents in the middle, a state taken after k batches
    a = write_jsonl(tmp_path / "a.jsonl", [" ".join(WORDS[: 1 + i % 9]) for i in range(50)])
    b = write_jsonl(
        tmp_path / "b.jsonl.zst", [" ".join(reversed(WORDS[: 2 + i % 5])) for i in range(30)], zstandard.open
    )
    cfg = cfg_for(sources=[(str(a), 2.0), (str(b), 1.0)], max_length=7)
    whole = TextStream(cfg, word_tok(), batch_size=3, seed=5)
    reference = _batches(whole, k + 12)
    first = TextStream(cfg, word_tok(), batch_size=3, seed=5)
    _batches(first, k)
    state = json.loads(json.dumps(first.state()))  # through JSON, as a checkpoint stores it
    assert len(json.dumps(state)) < 400
    resumed = TextStream(cfg, word_tok(), batch_size=3, seed=5)
    resumed.load_state(state)
    assert all(torch.equal(x, y) for x, y in zip(_batches(resumed, 12), reference[k:], strict=True))


def test_resume_inside_a_long_text_file_split_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_sources, "PIECE_BYTES", 16)  # pieces of ~16 bytes: many per document
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text(
        "".join(f"{WORDS[i % 10]} {WORDS[(i * 3) % 10]}\n" for i in range(40))
    )
    (tmp_path / "t" / "two.md").write_text("j i h\ng f\n")
    cfg = cfg_for(str(tmp_path / "t"), max_length=5)
    reference = _batches(TextStream(cfg, word_tok(), batch_size=2, seed=0), 20)
    first = TextStream(cfg, word_tok(), batch_size=2, seed=0)
    _batches(first, 6)
    resumed = TextStream(cfg, word_tok(), batch_size=2, seed=0)
    resumed.load_state(first.state())
    assert all(torch.equal(x, y) for x, y in zip(_batches(resumed, 14), reference[6:], strict=True))


def test_mixing_weights_give_the_share_of_documents(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["a"] * 20000)
    b = write_jsonl(tmp_path / "b.jsonl", ["b"] * 20000)
    s = TextStream(
        cfg_for(sources=[(str(a), 3.0), (str(b), 1.0)], max_length=64), word_tok(), batch_size=8, seed=1
    )
    ids = torch.cat([s.next()[0]["input_ids"].flatten() for _ in range(16)])  # 8192 tokens = 4096 documents
    n_a, n_b = (ids == 2).sum().item(), (ids == 3).sum().item()
    assert n_a + n_b == 4096
    assert abs(n_a / 4096 - 0.75) < 0.02  # binomial sd = 0.0068
    # the draws depend on the seed only
    assert (
        [uniform(1, k) for k in range(3)]
        == [uniform(1, k) for k in range(3)]
        != [uniform(2, k) for k in range(3)]
    )


def test_reads_gz_zst_and_text_trees_in_file_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    write_jsonl(root / "a.jsonl.gz", ["a b", "c"], gzip.open)
    write_jsonl(root / "b.jsonl.zst", ["d e f"], zstandard.open)
    (root / "c.md").write_text("g\nh\n")
    (root / "sub" / "d.txt").write_text("i j")
    (root / ".cache" / "x.txt").write_text("a a a")  # hidden: not data
    (root / "notes.csv").write_text("x\n1\n")  # not a streaming suffix: ignored
    assert [p.name for p in stream_files(str(root))] == ["a.jsonl.gz", "b.jsonl.zst", "c.md", "d.txt"]
    s = TextStream(cfg_for(str(root), max_length=13), word_tok(), batch_size=1, seed=0)
    batch, wheres = s.next()
    # a b E | c E | d e f E | g h E | i j E
    assert batch["input_ids"][0].tolist() == [2, 3, 0, 4, 0, 5, 6, 7, 0, 8, 9, 0, 10]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 0]
    assert wheres[0] == f"{root / 'a.jsonl.gz'}:1" and wheres[-1] == f"{root / 'sub' / 'd.txt'}:1"


def test_stream_and_record_readers_resolve_paths_alike(tmp_path):
    # one resolver (locate.find_files): the same hidden/rejects rules in a tree and a glob, the same hub ids
    from tunesmith.data.locate import (
        FILE_SUFFIXES,
        STREAM_JSONL_SUFFIXES,
        STREAM_TEXT_SUFFIXES,
        resolve_files,
    )

    root = tmp_path / "corpus"
    root.mkdir()
    write_jsonl(root / "a.jsonl", ["a b"])
    write_jsonl(root / "data_rejects.jsonl", ["j j j"])  # our own rejects report, left by an earlier run
    write_jsonl(root / ".hidden.jsonl", ["j j"])
    record = DataConfig(path="unused", format="text")
    for path in (str(root), str(root / "*.jsonl")):
        assert (
            [f.name for f in stream_files(path)]
            == [f.name for f in resolve_files(path, record)]
            == ["a.jsonl"]
        )
    for name in ("org/ds", "wikitext", "teknium/OpenHermes-2.5"):
        assert stream_files(name) is None and resolve_files(name, record) is None
    for name in ("missing.csv", "missing.jsonl.zst", "dir/missing.rst", "missing.json"):
        for find in (stream_files, lambda p: resolve_files(p, record)):
            with pytest.raises(UserError, match=rf"^{name}: file not found"):
                find(name)
    assert set(STREAM_JSONL_SUFFIXES + STREAM_TEXT_SUFFIXES) <= set(FILE_SUFFIXES)  # never taken for hub ids


def test_stream_errors_name_the_source_and_what_it_reads(tmp_path):
    (tmp_path / "notes.csv").write_text("x\n1\n")
    with pytest.raises(UserError, match=r"notes\.csv: streaming reads \.jsonl, .* files"):
        TextStream(cfg_for(str(tmp_path / "notes.csv")), word_tok(), 1, 0)
    with pytest.raises(UserError, match=r"gone\.jsonl: file not found \(check data\.sources;"):
        TextStream(cfg_for(sources=[(str(tmp_path / "gone.jsonl"), 1.0)]), word_tok(), 1, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: directory holds no data files \(\.jsonl, "):
        TextStream(cfg_for(str(tmp_path / "empty")), word_tok(), 1, 0)


def test_long_text_file_is_one_document_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_sources, "PIECE_BYTES", 8)
    (tmp_path / "long.txt").write_text("a b c\nd e f\ng h i\n")  # 3 pieces of 6 bytes... read as >= 8 bytes
    s = TextStream(cfg_for(str(tmp_path / "long.txt"), max_length=10), word_tok(), batch_size=1, seed=0)
    batch, _ = s.next()
    # one document: no EOS between pieces, positions run on across the piece boundary
    assert batch["input_ids"][0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert batch["position_ids"][0].tolist() == list(range(10))


def test_bad_rows_fail_with_place_or_are_skipped_and_counted(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a b"}\n{"text": \n{"body": "c"}\n\n{"text": "d"}\n')
    with pytest.raises(UserError, match=rf"{f}:2: invalid JSON"):
        TextStream(cfg_for(str(f), max_length=4), word_tok(), batch_size=1, seed=0).next()
    s = TextStream(cfg_for(str(f), max_length=5, on_bad_row="skip"), word_tok(), batch_size=1, seed=0)
    assert s.next()[0]["input_ids"][0].tolist() == [2, 3, 0, 5, 0]
    assert [r["where"] for r in s.rejects.items[:2]] == [f"{f}:2", f"{f}:3"]
    (tmp_path / "empty.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="no documents with text"):
        TextStream(cfg_for(str(tmp_path / "empty.jsonl"), on_bad_row="skip"), word_tok(), 1, 0).next()


def test_user_errors_for_epochs_other_sources_and_offline_hub(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["a b c"])
    s = TextStream(cfg_for(str(f)), word_tok(), batch_size=1, seed=0)
    with pytest.raises(UserError, match="set train.max_steps"):
        _ = s.batches_per_epoch
    state = s.state()
    other = TextStream(cfg_for(str(write_jsonl(tmp_path / "e.jsonl", ["a"]))), word_tok(), 1, 0)
    with pytest.raises(UserError, match="resume with the same data.path"):
        other.load_state(state)
    with pytest.raises(UserError, match="file not found"):
        TextStream(cfg_for(str(tmp_path / "missing.jsonl")), word_tok(), 1, 0)
    hub = TextStream(cfg_for("someone/corpus"), word_tok(), 1, 0)  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(UserError, match="someone/corpus: .*not a local file"):
        hub.next()


def test_train_streams_text_and_checkpoints_the_document_cursor(tmp_path, model_dir):
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl", [f"The revenue of company {i} was {i} million." for i in range(200)]
    )
    held_out = write_jsonl(tmp_path / "held_out.jsonl", ["The revenue of company 7 was 7 million."] * 4)
    from tunesmith.train.loop import train

    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={corpus}",
            "data.format=text",
            "data.streaming=true",
            f"data.test_path={held_out}",
            "data.max_length=32",
            "train.max_steps=4",
            "train.batch_size=2",
            "train.save_every=2",
            "train.log_every=1",
            f"out_dir={tmp_path / 'run'}",
        ],
    )
    result = train(cfg)
    assert result["steps"] == 4
    cursor = json.loads((tmp_path / "run" / "checkpoints" / "step-4" / "cursor.json").read_text())
    assert cursor["index"] == 4 and cursor["sources"][0]["file"] == 0  # TextStream's state, not EpochStream's

    # continued pretraining closes with held-out perplexity, base vs tuned (no questions to answer)
    from tunesmith.eval.compare import compare

    metrics = compare(cfg)
    assert metrics["tuned"]["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)
    assert metrics["delta"]["perplexity"] == pytest.approx(
        metrics["tuned"]["perplexity"] - metrics["base"]["perplexity"]
    )
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert (tmp_path / "run" / "eval" / "report.html").is_file()


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    sys.path.insert(0, {root!r})
    from tests import tiny
    from tunesmith.config import DataConfig
    from tunesmith.data.stream import TextStream
    from tunesmith.model.loss import loss_sum

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    tok = tiny.tokenizer()
    cfg = DataConfig(path={path!r}, format="text", streaming=True, max_length=128)
    stream = TextStream(cfg, tok, batch_size=8, seed=0)
    model = tiny.llama().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(5):  # a few real training steps
        batch, _ = stream.next()
        s, n = loss_sum(model, batch)
        (s / n).backward()
        opt.step(); opt.zero_grad()
        losses.append((s / n).item())
    after_steps = rss_mb()
    for _ in range(3000):  # then stream on without training: 3000 x 8 x 128 tokens, ~6 MB of this text
        stream.next()
    state = stream.state()
    # resume near the end of the corpus: one seek, nothing before it is read
    cursor = {{"file": 0, "offset": {tail}, "line": 0, "epoch": 0}}
    stream.load_state({{**state, "skip": 0, "sources": [cursor]}})
    for _ in range(3):
        stream.next()
    print(json.dumps({{"after_steps_mb": after_steps, "peak_mb": rss_mb(),
                      "offset": state["sources"][0]["offset"], "losses": losses}}))
""")


def _probe(path: Path, tail: int) -> dict:
    code = _MEMORY_PROBE.format(root=str(Path(__file__).parent.parent), path=str(path), tail=tail)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write_corpus(path: Path, target_bytes: int) -> tuple[int, int]:
    """A jsonl of >= `target_bytes`: a ~1 MiB block of numbered documents written again and again (~2 s/GB);
    returns (bytes written, block size)."""
    rows = [
        json.dumps(
            {
                "text": f"Document {i}: the revenue of company {i} grew by {i % 97} percent in "
                f"quarter {i % 4 + 1}, and the margin was {(i * 7) % 31} percent."
            }
        )
        + "\n"
        for i in range(8000)
    ]
    block = "".join(rows).encode()
    with open(path, "wb") as f:
        written = 0
        while written < target_bytes:
            f.write(block)
            written += len(block)
    return written, len(block)


@pytest.mark.slow
def test_one_gigabyte_corpus_streams_with_flat_memory(tmp_path):
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    size, block = _write_corpus(big, 1 << 30)
    _write_corpus(small, 1 << 20)
    try:
        on_big = _probe(big, tail=size - block)  # the start of the last block: a line start
        on_small = _probe(small, tail=0)
    finally:
        big.unlink()
    print(
        f"\npeak RSS: {on_big['peak_mb']:.0f} MB on a {size / 2**30:.2f} GiB corpus, "
        f"{on_small['peak_mb']:.0f} MB on 1 MiB; "
        f"after 5 steps {on_big['after_steps_mb']:.0f} MB; streamed {on_big['offset'] / 2**20:.1f} MiB"
    )
    assert size >= 1 << 30
    assert on_big["offset"] > 1 << 20  # it streamed more than the small corpus holds
    assert on_big["peak_mb"] - on_small["peak_mb"] < 64  # memory does not grow with the corpus
    assert on_big["peak_mb"] - on_big["after_steps_mb"] < 64  # nor with what was streamed
    assert on_big["losses"][-1] < on_big["losses"][0]


# ---- issue 16: empty sources are errors; a bad byte is reported on its own line (lone CRs end lines too)


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("e.jsonl", b"\n\r\n"), ("e.txt", b"")])
def test_empty_stream_source_is_an_error_naming_it(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    for policy in ("fail", "skip"):
        with pytest.raises(
            UserError, match=rf"^{f}: no data rows \(every file is empty or holds only blank lines"
        ):
            TextStream(cfg_for(str(f), on_bad_row=policy), word_tok(), 1, 0).next()


def test_stream_reports_a_bad_byte_on_line_41_with_cr_line_ends(tmp_path):
    # Was `d.jsonl:1: invalid JSON or UTF-8 (UnicodeDecodeError)`: the whole CR-ended file was one line.
    lines = [json.dumps({"text": "a b"}).encode()] * 40 + [
        b'{"text": "c\xff"}',
        json.dumps({"text": "d"}).encode(),
    ]
    data = b"\r".join(lines) + b"\r"
    f = tmp_path / "d.jsonl"
    f.write_bytes(data)
    with pytest.raises(
        UserError,
        match=rf"^{f}:41: invalid UTF-8 \(byte 0xff at column 12, file offset {data.index(b'c') + 1}\)",
    ):
        TextStream(cfg_for(str(f), max_length=200), word_tok(), 1, 0).next()
    s = TextStream(cfg_for(str(f), max_length=125, on_bad_row="skip"), word_tok(), 1, 0)
    assert s.next()[0]["input_ids"][0].tolist() == [2, 3, 0] * 40 + [
        5,
        0,
        2,
        3,
        0,
    ]  # line 42 ("d") follows line 40
    assert [r["where"] for r in s.rejects.items] == [f"{f}:41"]
    # a resume point inside the CR-split chunk continues at the exact line
    s2 = TextStream(cfg_for(str(f), max_length=3, on_bad_row="skip"), word_tok(), 1, 0)
    for _ in range(39):
        s2.next()
    state = s2.state()
    s3 = TextStream(cfg_for(str(f), max_length=3, on_bad_row="skip"), word_tok(), 1, 0)
    s3.load_state(state)
    assert [s2.next()[0]["input_ids"][0].tolist() for _ in range(3)] == [
        s3.next()[0]["input_ids"][0].tolist() for _ in range(3)
    ]


def test_stream_text_piece_names_the_line_of_the_bad_byte(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_bytes(b"a b\r\n" * 40 + b"c \xff\r\nd\r\n")
    with pytest.raises(
        UserError,
        match=rf"^{f}:41: invalid UTF-8 \(byte 0xff at column 3, file offset 202; lines 1-42 are skipped\)",
    ):
        TextStream(cfg_for(str(f), max_length=4), word_tok(), 1, 0).next()


def test_heldout_test_path_that_is_empty_or_all_bad_is_an_error(tmp_path, tok):
    from tunesmith.data.pipeline import build_heldout

    corpus = write_jsonl(tmp_path / "corpus.jsonl", ["a b c"])
    held = tmp_path / "held.jsonl"
    held.write_bytes(b"")
    base = [f"data.path={corpus}", "data.format=text", "data.streaming=true", f"data.test_path={held}"]
    with pytest.raises(UserError, match=rf"^{held}: no data rows \(the file has 0 bytes"):
        build_heldout(load_config(None, base), tok)
    held.write_bytes(b'{"body": "x"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=rf"^{held}: all 2 rows were skipped as bad \(see {tmp_path / 'run'}"):
        build_heldout(load_config(None, [*base, "data.on_bad_row=skip"]), tok, tmp_path / "run")


def test_skipped_rows_are_written_once_to_the_run_report_not_once_per_epoch(tmp_path):
    # The stream's skipped rows used to stay in memory only (and grew by one copy per epoch): a silent drop.
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a b"}\n{"body": "x"}\n{"text": "c"}\n')
    run = tmp_path / "run"
    s = TextStream(cfg_for(str(f), max_length=4, on_bad_row="skip"), word_tok(), 4, 0, out_dir=run)
    for _ in range(3):  # many epochs of a 2-document file
        s.next()
    lines = [json.loads(x) for x in (run / "data_rejects.jsonl").read_text().splitlines()]
    assert [(r["where"], r["field"]) for r in lines] == [(f"{f}:2", "text")]
    assert s.epoch > 1 and s.rejects.count == 1
    g = tmp_path / "bad.jsonl"
    g.write_text('{"body": "x"}\n')
    with pytest.raises(UserError) as e:
        TextStream(cfg_for(str(g), on_bad_row="skip"), word_tok(), 1, 0, out_dir=run).next()
    assert str(e.value) == (
        f"{g}: no documents with text in any file (check data.text_field='text'; 1 row skipped "
        f"as bad) (see {run / 'data_rejects.jsonl'})"
    )


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_stream_names_line_41_without_a_file_offset(tmp_path, suffix):
    data = (
        b"".join(json.dumps({"text": "a b"}).encode() + b"\r\n" for _ in range(40)) + b'{"text": "c\xff"}\r\n'
    )
    f = tmp_path / f"d{suffix}"
    f.write_bytes(
        gzip.compress(data) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    )
    with pytest.raises(
        UserError, match=rf"^{f}:41: invalid UTF-8 \(byte 0xff at column 12\) \(use data.on_bad_row"
    ):
        TextStream(cfg_for(str(f), max_length=200), word_tok(), 1, 0).next()


def test_data_hash_covers_the_files_the_stream_reads(tmp_path):
    # A corpus dir holding only .jsonl.zst (the record readers do not take it) and two mixed sources: the hash
    # is of what is streamed, so the resume guard sees a change to any of it.
    from tunesmith.data.pipeline import data_hash

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl.zst", ["a b c"], zstandard.open)
    other = write_jsonl(tmp_path / "other.jsonl", ["d e f"])
    single = data_hash(cfg_for(str(corpus)))  # used to fail: "directory holds no data files"
    mixed = data_hash(cfg_for(sources=[(str(corpus), 1.0), (str(other), 1.0)]))
    assert single != mixed
    write_jsonl(other, ["d e g"])
    assert data_hash(cfg_for(sources=[(str(corpus), 1.0), (str(other), 1.0)])) != mixed
    write_jsonl(corpus / "a.jsonl.zst", ["a b x"], zstandard.open)
    assert data_hash(cfg_for(str(corpus))) != single
