"""One report, two renderings: a self-contained HTML page and Markdown.

The report is a list of blocks (headings, paragraphs, tables, figures,
preformatted text). HTML embeds every figure as a base64 PNG data URI with
inline CSS and no scripts or external URLs, so it opens offline; Markdown
refers to the PNG files written beside it.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    filename: str  # the PNG beside report.md
    png: bytes
    caption: str


@dataclass
class Pre:
    text: str


Block = Heading | Para | Table | Figure | Pre

CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f7f7f7; padding: 0.6rem; white-space: pre-wrap; word-break: break-all; font-size: 0.8rem; }
"""

_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?$")


def _cell(text: str, tag: str) -> str:
    cls = ' class="num"' if tag == "td" and _NUMBER.match(text) else ""
    return f"<{tag}{cls}>{html.escape(text)}</{tag}>"


def _html_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p>{html.escape(b.text)}</p>"
    if isinstance(b, Table):
        head = "".join(_cell(h, "th") for h in b.headers)
        body = "\n".join("<tr>" + "".join(_cell(c, "td") for c in row) + "</tr>" for row in b.rows)
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        alt = html.escape(b.caption, quote=True)
        return (
            f'<figure><img class="figure" alt="{alt}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
        )
    return f"<pre>{html.escape(b.text)}</pre>"


def render_html(title: str, blocks: list[Block]) -> str:
    figures = sum(isinstance(b, Figure) for b in blocks)
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f'<style>{CSS}</style>\n</head>\n<body data-figures="{figures}">\n<h1>{html.escape(title)}</h1>\n'
        f"{body}\n</body>\n</html>\n"
    )


def _md_escape(text: str) -> str:
    text = re.sub(r"([\\`*\[\]|])", r"\\\1", text)
    return re.sub(r"<(?=[A-Za-z/!?])", r"\\<", text)  # only what could open an HTML tag


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_block(b: Block) -> str:
    if isinstance(b, Heading):
        return "#" * b.level + " " + _md_escape(b.text)
    if isinstance(b, Para):
        return _md_escape(b.text)
    if isinstance(b, Table):
        lines = ["| " + " | ".join(map(_md_escape, b.headers)) + " |", "|" + "---|" * len(b.headers)]
        lines += ["| " + " | ".join(_md_escape(c).replace("\n", " ") for c in row) + " |" for row in b.rows]
        return "\n".join(lines)
    if isinstance(b, Figure):
        return f"![{_md_escape(b.caption)}]({b.filename})\n\n*{_md_escape(b.caption)}*"
    fence = _fence(b.text)
    return f"{fence}text\n{b.text}\n{fence}"


def render_markdown(title: str, blocks: list[Block]) -> str:
    return "# " + _md_escape(title) + "\n\n" + "\n\n".join(_md_block(b) for b in blocks) + "\n"
