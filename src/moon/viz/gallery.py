"""A self-contained HTML retrieval gallery: each query with its top results, hits marked."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

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
    """One query and its ranked results. ``results`` items: (image or None, title, score or None, is_hit)."""

    query_text: str | None
    query_image: object | None
    label: str
    results: Sequence[tuple[object | None, str, float, bool]]


_CSS = """
.gal{font-family:system-ui,sans-serif;font-size:12px}
.gal .row{display:flex;gap:8px;align-items:flex-start;margin:10px 0;padding:6px;border-bottom:1px solid #eee}
.gal .q{width:150px;flex:none;background:#f6f6ff;padding:4px;border-radius:6px}
.gal .card{width:104px;flex:none;border:3px solid #ddd;border-radius:6px;padding:2px;overflow:hidden}
.gal .card.hit{border-color:#1a9c3a}
.gal .card img,.gal .q img{width:96px;height:96px;object-fit:contain;display:block;margin:auto}
.gal .t{height:3.6em;overflow:hidden}
.gal .s{color:#666}
"""


def retrieval_gallery_html(rows: Sequence[GalleryRow], *, thumb: int = 96) -> str:
    """HTML fragment (with its own <style>) showing each query and its ranked results."""
    parts = [f"<style>{_CSS}</style><div class='gal'>"]
    for row in rows:
        q_img = thumbnail_data_uri(row.query_image, thumb) if row.query_image is not None else ""
        parts.append("<div class='row'><div class='q'>")
        parts.append(f"<b>{html.escape(row.label)}</b><br>")
        if q_img:
            parts.append(f"<img src='{q_img}' alt='query photo'>")
        if row.query_text:
            parts.append(f"<div class='t'>“{html.escape(row.query_text)}”</div>")
        parts.append("</div>")
        for rank, (image, title, score, hit) in enumerate(row.results, 1):
            uri = thumbnail_data_uri(image, thumb) if image is not None else ""
            img_tag = f"<img src='{uri}' alt=''>" if uri else "<div style='height:96px'></div>"
            mark = "✔ " if hit else ""
            parts.append(
                f"<div class='card{' hit' if hit else ''}'>{img_tag}<div class='t'>{mark}{rank}. "
                f"{html.escape(title)}</div>"
                + (f"<div class='s'>{score:.3f}</div>" if score is not None and score == score else "")
                + "</div>"
            )
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)
