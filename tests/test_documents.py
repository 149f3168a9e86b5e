"""data/documents.py: finding and reading documents (Markdown, RST, HTML, PDF), sections by heading, token
windows, chunks.
"""

from __future__ import annotations

import pytest

from tunesmith.config import UserError
from tunesmith.data.documents import (
    chunk_documents,
    find_documents,
    read_document,
    sections,
    windows,
    word_spans,
)

# A manual with nested headings and a fenced `#` line; tests/test_synth.py also generates QA pairs from it.
DOC = """# Install
tunesmith installs with pip. Run pip install tunesmith inside a virtual environment.

## From source
Clone the repository and run make test. The Makefile creates the virtual environment.

```
# not a heading: a comment in code
pip install -e .
```

# Errors
A user error prints one line with the place, the cause and the way out. The exit code is 2.
An internal error prints a traceback and exits with code 1. Bad rows are reported with file and line.

# Serving
The server speaks the OpenAI chat completions protocol. It binds to the loopback address by default.
The playground page lets you compare the base and the tuned model side by side.
"""


def test_sections_split_on_markdown_and_underlined_headings_not_in_code():
    secs = sections(DOC)
    assert [h for h, _ in secs] == ["Install", "Install > From source", "Errors", "Serving"]
    assert "# not a heading" in secs[1][1]
    rst = "=====\nGuide\n=====\nintro\n\nUsage\n-----\nrun it\n\nFlags\n-----\nnone\n"
    assert sections(rst) == [("Guide", "intro"), ("Guide > Usage", "run it"), ("Guide > Flags", "none")]
    assert sections("plain text, no headings") == [("", "plain text, no headings")]


def test_token_windows_overlap_and_chunk_ids():
    assert windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert windows(3, 4, 1) == [(0, 3)]
    assert windows(8, 4, 0) == [(0, 4), (4, 8)]
    with pytest.raises(UserError, match="overlap_tokens"):
        windows(10, 4, 4)


def test_chunk_documents_by_heading_then_by_tokens(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("# One\nw0 w1 w2 w3 w4 w5 w6 w7 w8 w9\n# Two\nx y\n")
    chunks = chunk_documents(find_documents([doc]), word_spans, size=4, overlap=1)
    assert [(c.id, c.heading, c.text) for c in chunks] == [
        ("guide.md#0", "One", "w0 w1 w2 w3"),
        ("guide.md#1", "One", "w3 w4 w5 w6"),
        ("guide.md#2", "One", "w6 w7 w8 w9"),
        ("guide.md#3", "Two", "x y"),
    ]


def test_reads_html_rst_and_finds_documents_in_folders(tmp_path):
    (tmp_path / "site").mkdir()
    page = tmp_path / "site" / "index.html"
    page.write_text(
        "<html><head><title>t</title><script>var x = 1;</script></head><body>"
        "<h1>Guide</h1><p>Run <b>make test</b>.</p><h2>More</h2><p>Then serve.</p></body></html>"
    )
    assert sections(read_document(page)) == [("Guide", "Run make test."), ("Guide > More", "Then serve.")]
    (tmp_path / "site" / "notes.rst").write_text("Title\n=====\nbody\n")
    (tmp_path / "site" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "site" / ".hidden.md").write_text("# x\ny\n")
    assert [name for _, name in find_documents([tmp_path / "site"])] == ["site/index.html", "site/notes.rst"]
    with pytest.raises(UserError, match="no such file"):
        find_documents([tmp_path / "missing"])
    with pytest.raises(UserError, match="not a document"):
        find_documents([tmp_path / "site" / "image.png"])


def test_pdf_needs_the_extra(tmp_path):
    try:
        import pypdf  # noqa: F401
    except ImportError:
        (tmp_path / "a.pdf").write_bytes(b"%PDF-1.4")
        with pytest.raises(UserError, match=r"tunesmith\[pdf\]"):
            read_document(tmp_path / "a.pdf")
    else:
        pytest.skip("pypdf is installed: PDFs are read")
