"""One self-contained HTML page of tables, text and PNG figures: styles inline, images as base64
data URIs, no link to anything outside, so the file opens offline and can be mailed or archived."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

STYLE = """body { font-family: sans-serif; margin: 2em; max-width: 80em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
pre { background: #f8f8f8; padding: 0.6em; white-space: pre-wrap; }
img { max-width: 100%; margin: 1em 0; }"""

Section = tuple[str, "pd.DataFrame | list[str]"]  # a heading, and a table or lines of text


def png_data_uri(path: str | Path) -> str:
    """A PNG file as a `data:image/png;base64,...` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render(title: str, sections: list[Section], figures: dict[str, Path]) -> str:
    """The page: a heading, each section (table or text), then each figure embedded."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, pd.DataFrame):
            parts.append(content.to_html(index=False, na_rep="", border=0))
        else:
            parts.append(f"<pre>{html.escape(chr(10).join(content))}</pre>")
    for name, path in figures.items():
        if Path(path).suffix == ".png":
            parts.append(f"<h2>{html.escape(name)}</h2>"
                         f"<img alt=\"{html.escape(name)}\" src=\"{png_data_uri(path)}\">")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_page(path: str | Path, title: str, sections: list[Section], figures: dict[str, Path]) -> Path:
    """Write render(...) to `path` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, sections, figures), encoding="utf-8")
    return path
