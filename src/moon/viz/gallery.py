"""A self-contained HTML retrieval gallery: each query, the product it led to, and the model's top
results with hits marked."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

from moon.data import ImageLoadError, load_image


def thumbnail_data_uri(image, size: int = 96) -> str:
    """A JPEG thumbnail as a ``data:`` URI (empty string if the image cannot be read)."""
    try:
        img = load_image(image)
    except ImageLoadError:
        return ""
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class GalleryRow:
    """One query and its ranked results.

    ``results`` items: (image or None, title, score or None, is_hit). ``purchased``: what the
    query led to, items (image or None, title, where the model ranked it, e.g. ``"rank 37"``);
    ``note``: a line shown under the query (e.g. that another query got the same top 5).
    """

    query_text: str | None
    query_image: object | None
    label: str
    results: Sequence[tuple[object | None, str, float | None, bool]]
    purchased: Sequence[tuple[object | None, str, str]] = field(default_factory=list)
    note: str = ""


_CSS = """
.gal{font-family:system-ui,sans-serif;font-size:12px}
.gal .row{display:flex;gap:8px;align-items:flex-start;margin:10px 0;padding:6px;border-bottom:1px solid #eee}
.gal .q{width:150px;flex:none;background:#f6f6ff;padding:4px;border-radius:6px}
.gal .card{width:104px;flex:none;border:3px solid #ddd;border-radius:6px;padding:2px;overflow:hidden}
.gal .card.hit{border-color:#1a9c3a;background:#eaf7ee}
.gal .card.bought{border-color:#2f5fd0;border-style:dashed;background:#f0f4ff}
.gal .tag{font-weight:600;font-size:11px}
.gal .hit .tag{color:#1a7c30}
.gal .bought .tag{color:#2f5fd0}
.gal .note{color:#a0522d;font-size:11px;margin-top:3px}
.gal .sep{width:2px;flex:none;align-self:stretch;background:#ccc;margin:0 4px}
.gal .card img,.gal .q img{width:96px;height:96px;object-fit:contain;display:block;margin:auto}
.gal .t{height:3.6em;overflow:hidden}
.gal .s{color:#666}
"""


def _card(image: object | None, thumb: int, cls: str, tag: str, title: str, extra: str = "") -> str:
    uri = thumbnail_data_uri(image, thumb) if image is not None else ""
    img_tag = f"<img src='{uri}' alt=''>" if uri else f"<div style='height:{thumb}px'></div>"
    tag_html = f"<div class='tag'>{html.escape(tag)}</div>" if tag else ""
    return f"<div class='card{cls}'>{img_tag}{tag_html}<div class='t'>{html.escape(title)}</div>{extra}</div>"


def retrieval_gallery_html(rows: Sequence[GalleryRow], *, thumb: int = 96) -> str:
    """HTML fragment (with its own <style>): per row the query, the purchased product(s) (dashed
    blue, with the model's rank of it), a divider, then the ranked results — a hit (a purchased
    product) green with ``✔ purchased``."""
    parts = [f"<style>{_CSS}</style><div class='gal'>"]
    for row in rows:
        q_img = thumbnail_data_uri(row.query_image, thumb) if row.query_image is not None else ""
        parts.append("<div class='row'><div class='q'>")
        parts.append(f"<b>{html.escape(row.label)}</b><br>")
        if q_img:
            parts.append(f"<img src='{q_img}' alt='query photo'>")
        if row.query_text:
            parts.append(f"<div class='t'>“{html.escape(row.query_text)}”</div>")
        if row.note:
            parts.append(f"<div class='note'>{html.escape(row.note)}</div>")
        parts.append("</div>")
        for image, title, where in row.purchased:
            parts.append(_card(image, thumb, " bought", f"purchased · {where}", title))
        if row.purchased:
            parts.append("<div class='sep'></div>")
        for rank, (image, title, score, hit) in enumerate(row.results, 1):
            extra = f"<div class='s'>{score:.3f}</div>" if score is not None and score == score else ""
            tag = f"{rank}. ✔ purchased" if hit else f"{rank}."
            parts.append(_card(image, thumb, " hit" if hit else "", tag, title, extra))
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)
