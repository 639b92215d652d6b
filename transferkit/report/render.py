"""A report as a list of sections of simple blocks, rendered to one self-contained HTML file and to Markdown.

The HTML embeds every image as a base64 PNG and carries its own CSS: it opens offline, from an
e-mail attachment or a CI artifact, with no external script or style sheet. The Markdown refers
to the PNG files written beside it. All text given to the blocks is plain text: it is escaped for
each format here (class and file names may hold ``<``, ``&``, ``|`` or ``*``).

Example:
    >>> doc = [Section("summary", "Summary", [Paragraph("Accuracy 0.95 on <test>.")])]
    >>> "&lt;test&gt;" in render_html("Report", doc, Path("."))
    True
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Paragraph:
    text: str
    muted: bool = False


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence]
    #: Columns (by index) holding numbers: right-aligned.
    numeric: Sequence[int] = ()
    #: Columns (by index) of short names never broken across lines in HTML (e.g. the compared heads).
    nowrap: Sequence[int] = ()
    #: Long tables scroll inside a box in HTML instead of pushing the rest of the page down.
    scroll: bool = False


@dataclass
class Image:
    """A PNG file, given relative to the report's folder."""

    path: str
    alt: str
    caption: str = ""
    #: Show at full size, scrolling sideways if wider than the page (e.g. a 100-class matrix).
    full_size: bool = False


@dataclass
class Gallery:
    """Thumbnails with caption lines; ``path`` None shows the caption only (e.g. a missing file)."""

    items: Sequence[tuple[str | None, Sequence[str]]]


@dataclass
class Cards:
    """Headline numbers: (label, value) pairs."""

    items: Sequence[tuple[str, str]]


@dataclass
class Row:
    """Columns side by side in HTML (wrapping on narrow screens), one after another in Markdown.

    Each item of ``blocks`` is a block or a list of blocks (one column).
    """

    blocks: Sequence
    #: Columns share the width equally (images shrink to fit) instead of taking their natural width.
    equal: bool = False


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg2: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
p { margin: 8px 0; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
nav { font-size: 14px; margin: 10px 0 4px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 140px;
        background: var(--bg2); }
.card .v { font-size: 22px; font-weight: 600; overflow-wrap: anywhere; }
.card .l { font-size: 13px; color: var(--muted); }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top;
         max-width: 520px; overflow-wrap: anywhere; }
th { background: var(--bg2); position: sticky; top: 0; }
th { overflow-wrap: break-word; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.n, td.nw { white-space: nowrap; }
tr:nth-child(even) td { background: #fbfcfd; }
.scroll { max-height: 460px; overflow: auto; display: inline-block; max-width: 100%;
          border-bottom: 1px solid var(--line); }
.scroll table { margin: 0; }
.row { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
.row > div { min-width: 0; max-width: 100%; }
.row.equal > div { flex: 1 1 420px; }
.row td { max-width: 330px; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figure.wide { overflow-x: auto; }
figure.wide img { max-width: none; }
figcaption { font-size: 13px; color: var(--muted); }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 14px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 8px; font-size: 13px; background: var(--bg2); }
.tile img { display: block; margin: 0 auto 6px; width: 100%; max-width: 200px; height: 180px; object-fit: contain; }
.tile div { overflow-wrap: anywhere; }
.tile .t { font-weight: 600; }
"""


def render_html(title: str, sections: Sequence[Section], base_dir: Path, subtitle: str = "") -> str:
    """One HTML page; images under ``base_dir`` are read and embedded as ``data:`` URIs."""
    e = _escape_html
    nav = " ".join(f'<a href="#{e(s.id)}">{e(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{e(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="muted">{e(subtitle)}</p>')
    parts.append(f"<nav>{nav}</nav>")
    for section in sections:
        parts.append(f'<section id="{e(section.id)}"><h2>{e(section.title)}</h2>')
        parts.extend(_html_block(block, base_dir) for block in section.blocks)
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _html_block(block, base_dir: Path) -> str:
    e = _escape_html
    if isinstance(block, Paragraph):
        return f'<p class="muted">{e(block.text)}</p>' if block.muted else f"<p>{e(block.text)}</p>"
    if isinstance(block, Row):
        return f'<div class="row{" equal" if block.equal else ""}">' + "".join(
            "<div>" + "".join(_html_block(b, base_dir) for b in _as_list(item)) + "</div>" for item in block.blocks
        ) + "</div>"
    if isinstance(block, Cards):
        cards = "".join(f'<div class="card"><div class="v">{e(v)}</div><div class="l">{e(k)}</div></div>'
                        for k, v in block.items)
        return f'<div class="cards">{cards}</div>'
    if isinstance(block, Table):
        def css(i, tag):
            if i in block.numeric:
                return " class=n"
            return " class=nw" if i in block.nowrap and tag == "td" else ""

        def cells(row, tag):
            return "".join(f'<{tag}{css(i, tag)}>{e(_text(v))}</{tag}>' for i, v in enumerate(row))

        body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in block.rows)
        table = f"<table><thead><tr>{cells(block.header, 'th')}</tr></thead><tbody>{body}</tbody></table>"
        return f'<div class="scroll">{table}</div>' if block.scroll else table
    if isinstance(block, Image):
        caption = f"<figcaption>{e(block.caption)}</figcaption>" if block.caption else ""
        wide = ' class="wide"' if block.full_size else ""
        return f'<figure{wide}><img src="{_data_uri(base_dir / block.path)}" alt="{e(block.alt)}">{caption}</figure>'
    if isinstance(block, Gallery):
        tiles = []
        for path, lines in block.items:
            img = f'<img src="{_data_uri(base_dir / path)}" alt="{e(lines[0] if lines else "")}">' if path else ""
            text = "".join(f'<div{" class=t" if i == 0 else ""}>{e(line)}</div>' for i, line in enumerate(lines))
            tiles.append(f'<div class="tile">{img}{text}</div>')
        return f'<div class="gallery">{"".join(tiles)}</div>'
    raise TypeError(f"Unknown report block {type(block).__name__}")


def render_markdown(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """Markdown (GitHub flavour) with images referenced by their relative paths."""
    m = escape_markdown
    lines = [f"# {m(title)}", ""]
    if subtitle:
        lines += [f"*{m(subtitle)}*", ""]
    lines += [" · ".join(f"[{m(s.title)}](#{s.id})" for s in sections), ""]
    for section in sections:
        lines += [f'<a id="{section.id}"></a>', "", f"## {m(section.title)}", ""]
        for block in section.blocks:
            lines += _md_block(block) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _md_block(block) -> list[str]:
    m = escape_markdown
    if isinstance(block, Paragraph):
        return [f"*{m(block.text)}*" if block.muted else m(block.text)]
    if isinstance(block, Row):
        return [line for item in block.blocks for b in _as_list(item) for line in _md_block(b) + [""]][:-1]
    if isinstance(block, Cards):
        return _md_table([k for k, _ in block.items], [[v for _, v in block.items]], range(len(block.items)))
    if isinstance(block, Table):
        return _md_table(block.header, block.rows, block.numeric)
    if isinstance(block, Image):
        out = [f"![{m(block.alt)}]({_md_path(block.path)})"]
        return out + ["", f"*{m(block.caption)}*"] if block.caption else out
    if isinstance(block, Gallery):
        out = []
        for path, lines in block.items:
            text = " — ".join(m(line) for line in lines)
            out += [f"![{m(lines[0] if lines else '')}]({_md_path(path)})<br>{text}" if path else text, ""]
        return out[:-1]
    raise TypeError(f"Unknown report block {type(block).__name__}")


def _md_table(header, rows, numeric) -> list[str]:
    m = escape_markdown
    align = ["---:" if i in numeric else "---" for i in range(len(header))]
    return ["| " + " | ".join(m(h) for h in header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(m(_text(v)) for v in row) + " |" for row in rows
    ]


def _md_path(path: str) -> str:
    # Angle brackets let a link target hold spaces; our own file names never hold '<' or '>'.
    return f"<{path}>" if " " in path else path


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def escape_markdown(text: str) -> str:
    """Plain text made safe inside Markdown: no emphasis, links, table breaks or raw HTML.

    Example:
        >>> escape_markdown("a|b <i>_x_</i>")
        'a\\\\|b &lt;i&gt;\\\\_x\\\\_&lt;/i&gt;'
    """
    text = " ".join(str(text).split())  # a newline would end a table row
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    # At the start of a line these would make a heading or a list.
    if text[:1] in ("#", "+", "-"):
        return "\\" + text
    return re.sub(r"^(\d+)\.(?=\s)", r"\1\\.", text)


def _as_list(item) -> list:
    return list(item) if isinstance(item, (list, tuple)) else [item]


def _escape_html(text) -> str:
    return html.escape(str(text), quote=True)


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
