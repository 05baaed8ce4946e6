"""The one renderer of pages and reports: a document as blocks, written as Markdown or as HTML.

A *block* is one of ``("h1" | "h2" | "h3", text)``, ``("p", text)``, ``("table", header, rows)``
or ``("figures", {name: png_bytes})``. The diagnostic report, the run comparison and the model
card are built as blocks and rendered here: Markdown escapes ``<``, ``>`` and ``&`` (no HTML gets
through, quotes stay legible), HTML goes through jinja2 templates that ship in the package
(``medvlm/templates/html/``) with autoescape on, so a question holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

HTML_TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "html"

Block = tuple


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"[{_fmt(value[0])}, {_fmt(value[1])}]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def md_text(x: Any) -> str:
    """Text for Markdown: ``<``, ``>`` and ``&`` escaped, quotes kept as they are."""
    return html.escape(str(x), quote=False)


def md_cell(x: Any) -> str:
    return md_text(_fmt(x)).replace("|", "&#124;").replace("\n", " ")


def render_markdown(blocks: list[Block], figure_dir: Path | None = None, figure_prefix: str = "figures",
                    heading_offset: int = 0) -> str:
    """Markdown; figures are written to ``figure_dir`` and linked, or left out when it is None."""
    lines: list[str] = []
    n_fig = 0
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * (int(kind[1]) + heading_offset) + " " + md_text(block[1]), ""]
        elif kind == "p":
            lines += [md_text(block[1]), ""]
        elif kind == "table":
            head, rows = block[1], block[2]
            lines += ["| " + " | ".join(map(md_cell, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(md_cell, r)) + " |" for r in rows] + [""]
        elif kind == "figures" and figure_dir is not None:
            for name, png in block[1].items():
                n_fig += 1
                fname = f"{n_fig:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
                figure_dir.mkdir(parents=True, exist_ok=True)
                (figure_dir / fname).write_bytes(png)
                lines += [f"![{md_text(name)}]({figure_prefix}/{fname})", ""]
    return "\n".join(lines)


def png_uri(image: bytes | np.ndarray) -> str:
    """A ``data:`` URI of PNG bytes or of a uint8 image array."""
    if not isinstance(image, (bytes, bytearray)):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").save(buf, format="PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(bytes(image)).decode("ascii")


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` become ``\\u`` escapes, so no tag can close it."""
    text = json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HTML_TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(png_uri=png_uri, script_json=script_json, fmt=_fmt)
    return env


def render_page(template: str, **context: Any) -> str:
    """Render ``medvlm/templates/html/<template>`` (autoescaped) with ``context``."""
    return environment().get_template(template).render(**context)


def render_html(blocks: list[Block], title: str) -> str:
    """One self-contained page of ``blocks`` (inline CSS, figures as base64 PNG); all text escaped."""
    return render_page("blocks.html.j2", title=title, blocks=blocks)
