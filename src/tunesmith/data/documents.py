"""Documents -> titled chunks for synth: find, read (.md .txt .rst as is, .html, .pdf with the `pdf` extra),
split into sections by headings (Markdown `#`, RST/setext underlines; not inside code fences), then into
token windows with overlap, the tokens counted by the caller's `spans` (a tokenizer's offsets or words).
"""

from __future__ import annotations

import html.parser
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import UserError

DOC_SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".html", ".htm", ".pdf")
_ATX = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_UNDERLINE = re.compile(r"^([=\-~^\"'`*+#])\1{2,}\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass
class Chunk:
    """A piece of a document to ask questions about; `id` = `source#k` is stable across runs."""

    id: str
    source: str
    heading: str
    text: str


class _HtmlText(html.parser.HTMLParser):
    """HTML -> text with `#` headings (so sections split the same way as Markdown); scripts/styles dropped."""

    BLOCKS = {
        "p",
        "div",
        "li",
        "br",
        "tr",
        "pre",
        "section",
        "article",
        "table",
        "ul",
        "ol",
        "dt",
        "dd",
        "blockquote",
    }

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("script", "style", "nav", "head"):
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "nav", "head"):
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data if "\n" not in data.strip() else " ".join(data.split()))


def read_document(path: Path) -> str:
    """The text of one document (.md .txt .rst as is, .html as text with # headings, .pdf page by page)."""
    name = path.name.lower()
    if name.endswith(".pdf"):
        try:
            import pypdf
        except ImportError:
            raise UserError(f"{path}: reading PDF needs pypdf (pip install 'tunesmith[pdf]')") from None
        return "\n\n".join(page.extract_text() or "" for page in pypdf.PdfReader(path).pages)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte {e.start} (re-save the file as UTF-8)") from None
    if name.endswith((".html", ".htm")):
        parser = _HtmlText()
        parser.feed(text)
        text = re.sub(r"\n{3,}", "\n\n", "".join(parser.parts))
    return text


def find_documents(paths: list[Path]) -> list[tuple[Path, str]]:
    """Files and folders -> sorted (document file, name); the name (`folder/sub/file.md`, or the file's name
    when given directly) is the provenance `source` and the stem of chunk ids, the same on every machine."""
    out: dict[Path, str] = {}
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if (
                    f.is_file()
                    and f.name.lower().endswith(DOC_SUFFIXES)
                    and not any(x.startswith(".") for x in rel.parts)
                ):
                    out.setdefault(f, f"{p.resolve().name}/{rel.as_posix()}")
        elif p.is_file():
            if not p.name.lower().endswith(DOC_SUFFIXES):
                raise UserError(f"{p}: not a document synth reads ({' '.join(DOC_SUFFIXES)})")
            out.setdefault(p, p.name)
        else:
            raise UserError(f"{p}: no such file or folder")
    if not out:
        raise UserError(f"{' '.join(map(str, paths))}: no documents found ({' '.join(DOC_SUFFIXES)})")
    return list(out.items())


def sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) per section: Markdown `#` headings, underlined (RST/setext) titles; not in code.

    >>> sections("intro\\n# A\\nx\\n## B\\ny\\nC\\n===\\nz")
    [('', 'intro'), ('A', 'x'), ('A > B', 'y'), ('C', 'z')]
    """
    lines = text.splitlines()
    out, stack, body, fenced, styles = [], [], [], False, []
    heading = ""

    def close() -> None:
        if "".join(body).strip():
            out.append((heading, "\n".join(body).strip()))
        body.clear()

    i = 0
    while i < len(lines):
        line, nxt = lines[i], lines[i + 1] if i + 1 < len(lines) else ""
        fenced ^= bool(_FENCE.match(line))
        atx = None if fenced else _ATX.match(line)
        under = (
            not fenced
            and line.strip()
            and not line[0].isspace()
            and _UNDERLINE.match(nxt)
            and len(nxt.strip()) >= len(line.strip())
            and not _UNDERLINE.match(line)
        )
        if atx or under:
            if body and _UNDERLINE.match(body[-1]):
                body.pop()  # an RST overline above this title
            close()
            if under:  # underline styles get levels in order of first use (the RST rule)
                style = nxt.strip()[0]
                styles += [] if style in styles else [style]
            level, title = (
                (len(atx.group(1)), atx.group(2)) if atx else (styles.index(style) + 1, line.strip())
            )
            stack = [s for s in stack if s[0] < level] + [(level, title)]
            heading = " > ".join(t for _, t in stack)
            i += 1 if atx else 2
            continue
        if not _UNDERLINE.match(line) or body:  # an RST overline before a title is not text
            body.append(line)
        i += 1
    close()
    return out


def windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [start, end) of `size` stepping by size - overlap; the last one ends at n.

    >>> windows(10, 4, 1)
    [(0, 4), (3, 7), (6, 10)]
    """
    if overlap >= size:
        raise UserError(f"synth.overlap_tokens ({overlap}) must be smaller than synth.chunk_tokens ({size})")
    step = size - overlap
    return [(s, min(s + size, n)) for s in range(0, max(n - overlap, 1), step)]


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of whitespace-separated words: the token count used for remote generators."""
    return [m.span() for m in re.finditer(r"\S+", text)]


def chunk_documents(
    docs: list[tuple[Path, str]], spans: Callable[[str], list[tuple[int, int]]], size: int, overlap: int
) -> list[Chunk]:
    """Every (document, name) -> sections -> windows of `size` tokens (counted by `spans`) with `overlap`."""
    chunks = []
    for path, name in docs:
        k = 0
        for heading, body in sections(read_document(path)):
            sp = spans(body)
            for a, b in windows(len(sp), size, overlap) if sp else []:
                chunks.append(Chunk(f"{name}#{k}", name, heading, body[sp[a][0] : sp[b - 1][1]]))
                k += 1
    return chunks
