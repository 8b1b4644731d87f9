"""HTML primitives of the report: every text escaped, tables, PNGs embedded as data: URIs, and
the page with its inline CSS. No JavaScript, no external resources (fonts are the system's)."""

from __future__ import annotations

import base64
import html
import struct
from collections.abc import Sequence

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")      # metadata (matplotlib writes its URL there)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 1250px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.0em; margin-bottom: .3em; }
table { border-collapse: collapse; margin: .4em 0 1em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .2em .55em; }
th { background: #f0f0f0; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.diff { background: #fff4d6; }
td.headline { font-weight: bold; background: #e8f1ff; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: .5em 0 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #555; }
p.note { font-size: .85em; color: #555; }
pre { font-size: .75em; background: #f8f8f8; padding: .6em; overflow-x: auto; }
code { font-size: .9em; }
"""


def esc(text) -> str:
    """str(text), HTML-escaped (quotes too)."""
    return html.escape(str(text), quote=True)


def strip_png_text(png: bytes) -> bytes:
    """The PNG without its text metadata chunks (tEXt, zTXt, iTXt): matplotlib writes a
    "Software" entry with its web address, and the page holds no URL. ValueError if not a PNG."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    out, i = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while i + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[i:i + 8])
        end = i + 12 + length                     # length, type, data, CRC
        if kind not in TEXT_CHUNKS:
            out.append(png[i:end])
        i = end
    return b"".join(out)


def img(png: bytes, alt: str) -> str:
    """An <img> holding the PNG as a base64 data: URI (metadata chunks stripped)."""
    data = base64.b64encode(strip_png_text(png)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def figure(png: bytes, caption: str) -> str:
    return f"<figure>{img(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(header: Sequence[str], rows: Sequence[Sequence], *, id: str | None = None,
          numeric: Sequence[bool] | None = None, cell_class=None, row_class=None) -> str:
    """A <table>: a header row, then one row per entry of `rows` (cells str()-ed and escaped).
    numeric[i]: right-align column i (default: every column but the first). cell_class(r, c) and
    row_class(r) -> an extra CSS class (or None) for a cell / a row."""
    numeric = [i > 0 for i in range(len(header))] if numeric is None else list(numeric)
    out = [f'<table id="{esc(id)}">' if id else "<table>",
           "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for r, row in enumerate(rows):
        rc = row_class(r) if row_class else None
        cells = []
        for c, v in enumerate(row):
            classes = [x for x in ("num" if numeric[c] else None, cell_class(r, c) if cell_class else None) if x]
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{esc(v)}</td>")
        out.append((f'<tr class="{rc}">' if rc else "<tr>") + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def section(title: str, *parts: str, level: int = 2) -> str:
    return f"<section>\n<h{level}>{esc(title)}</h{level}>\n" + "\n".join(p for p in parts if p) + "\n</section>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def row(*parts: str) -> str:
    """Blocks side by side (wrapping)."""
    return '<div class="row">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"


def details(summary: str, text: str) -> str:
    """A collapsed block of preformatted text (HTML's own <details>: no script)."""
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"


def page(title: str, body: Sequence[str]) -> str:
    """The whole document: <!DOCTYPE html>, one <html>, <head> (charset, title, inline CSS) and
    <body>."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{esc(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n")

