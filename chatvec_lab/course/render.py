"""A report as blocks → Markdown (``README.md``) and a self-contained HTML page (``index.html``).

A block is a tuple: ``("h1" | "h2" | "p", text)``, ``("fig", file name, caption)``, ``("table", DataFrame, caption)``
or ``("ul", [items])``. Text may hold a little Markdown (`code`, **bold**, *italic*, [links](url)). The page's style
is inline, its figures are files beside it (``figures/``), and it loads nothing from the network.
"""
from __future__ import annotations

import html
import re
from urllib.parse import quote

import pandas as pd


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<i>\1</i>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f"<a href=\"{m.group(2)}\">{m.group(1)}</a>", out)


def _md_cell(v) -> str:
    return html.escape(str(v), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(blocks) -> str:
    out = []
    for b in blocks:
        if b[0] == "h1":
            out.append(f"# {b[1]}")
        elif b[0] == "h2":
            out.append(f"## {b[1]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "fig":
            out.append(f"![{b[1]}](figures/{quote(b[1])})\n\n*{b[1]}*: {b[2]}" if b[2] else
                       f"![{b[1]}](figures/{quote(b[1])})")
        elif b[0] == "table":
            out.append(f"{b[2]}\n\n{_md_table(b[1])}")
        elif b[0] == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
    return "\n\n".join(out) + "\n"


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45;"
         "color:#222}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
         "figure{margin:1.2em 0}figure img{max-width:100%}figcaption{color:#444;font-size:.93em;max-width:820px}"
         "table{border-collapse:collapse;font-size:.9em;margin:.4em 0 1.2em}td,th{border:1px solid #ccc;"
         "padding:3px 6px;text-align:left;vertical-align:top}th{background:#f4f4f4}"
         "caption{text-align:left;caption-side:top;padding:4px 0;color:#444}code{background:#f4f4f4;padding:0 3px}")


def render_html(blocks) -> str:
    """A self-contained page: inline style, no script, figures as relative files."""
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>chatvec_lab report</title>",
             f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2"):
            parts.append(f"<{b[0]}>{_inline_html(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] == "fig":
            parts.append(f"<figure><img src=\"figures/{quote(b[1])}\" alt=\"{html.escape(b[1])}\">"
                         f"<figcaption><b>{html.escape(b[1])}</b>: {_inline_html(b[2])}</figcaption></figure>")
        elif b[0] == "table":
            table = b[1].to_html(index=False, escape=True, border=0)
            table = table.replace("<thead>", f"<caption>{_inline_html(b[2])}</caption><thead>", 1)
            parts.append(f"<div style='overflow-x:auto'>{table}</div>")
        elif b[0] == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
