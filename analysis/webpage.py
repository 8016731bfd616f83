"""A report as one self-contained HTML page: `report.md` with its figures embedded, for the MLflow UI.

MLflow's artifact viewer shows a markdown file but not the images it links to (a figure reads as literal
`![...](margin_shift.png)`); it shows an HTML file in a frame. So next to every `report.md` the report writes
`report.html`: the same text rendered (markdown-it, raw HTML in the markdown escaped, never passed through),
each local image inlined as a `data:` URI, and links to other local `.md` files pointed at their `.html`.

    from analysis.webpage import write_html
    write_html(Path("results/two_round/report.md"))   # -> results/two_round/report.html
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path
from urllib.parse import unquote, urlparse

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px; line-height: 1.5;
       max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #1f2328; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
img { max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
h1, h2, h3 { border-bottom: 1px solid #d8dee4; padding-bottom: 0.2em; }
"""


def _local(target: str, folder: Path) -> Path | None:
    """The file a relative link names inside `folder`, or None for a URL, an anchor or a path leaving it."""
    parsed = urlparse(target)
    if parsed.scheme or parsed.netloc or not parsed.path or target.startswith("#"):
        return None
    path = (folder / unquote(parsed.path)).resolve()
    return path if path.is_relative_to(folder.resolve()) else None


def render(markdown: str, folder: Path) -> str:
    """The page for `markdown` whose relative links resolve in `folder`."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                path = _local(str(child.attrGet("src") or ""), folder)
                if path is not None and path.is_file():
                    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                    child.attrSet("src", f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}")
            elif child.type == "link_open":
                href = str(child.attrGet("href") or "")
                if href.endswith(".md") and _local(href, folder) is not None:
                    child.attrSet("href", href[: -len(".md")] + ".html")
    title = next((line[2:].strip() for line in markdown.splitlines() if line.startswith("# ")), "report")
    body = md.renderer.render(tokens, md.options, {})
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")


def write_html(md_path: Path) -> Path:
    """Write `<same name>.html` next to a markdown report; returns its path."""
    out = md_path.with_suffix(".html")
    out.write_text(render(md_path.read_text(), md_path.parent))
    return out
