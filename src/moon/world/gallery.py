"""A visual sample of a product store for people to look at: listings with their true boxes drawn,
and queries next to the products purchased after them. HTML (self-contained, images inlined) or a
PNG contact sheet, chosen by the output file's extension. Works on any store that has images.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from moon.data import Box, Product, ProductStore, Query, load_image
from moon.errors import ConfigError
from moon.world.appearance import font

THUMB = 160
_KIND_COLORS = {
    "clean": (0, 170, 0),
    "scene": (255, 40, 40),
    "banner": (255, 140, 0),
    "detail": (0, 120, 255),
    "query": (200, 0, 200),
}


def _boxes_by_image(store: ProductStore, wanted: set[str]) -> dict[str, list[Box]]:
    """Boxes of the ``wanted`` images only (the box table is streamed, never held whole)."""
    out: dict[str, list[Box]] = {}
    for b in store.iter_boxes():
        if b.image in wanted:
            out.setdefault(b.image, []).append(b)
    return out


def _thumb(store: ProductStore, path: str, boxes: list[Box]) -> Image.Image:
    """The image at ``THUMB`` px with every box drawn (truth solid, detectors thin)."""
    img = load_image(path)  # bounded and safe: a FIFO or huge file is a one-line error, never a hang
    s = THUMB / max(img.size)
    img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for b in boxes:
        color = _KIND_COLORS.get(b.kind or "", (255, 255, 0)) if b.source == "truth" else (0, 230, 230)
        draw.rectangle(
            (b.x0 * s, b.y0 * s, b.x1 * s - 1, b.y1 * s - 1), outline=color, width=2 if b.source == "truth" else 1
        )
        draw.text((b.x0 * s + 2, b.y0 * s + 1), b.kind or b.source, fill=color, font=font(10))
    return img


def _rel(store: ProductStore, path: str) -> str:
    return Path(path).resolve().relative_to(store.root).as_posix()


def _sample(
    store: ProductStore, n_products: int, n_queries: int, seed: int
) -> tuple[list[Product], list[tuple[Query, list[Product]]]]:
    rng = np.random.default_rng(seed)
    ids = store.product_ids()
    pick = sorted(int(i) for i in rng.choice(len(ids), size=min(n_products, len(ids)), replace=False))
    products = [store.product(ids[i]) for i in pick]
    positives = store.positives()
    queries: list[tuple[Query, list[Product]]] = []
    by_mod: dict[str, list[Query]] = {}
    for q in store.iter_queries():
        if q.id in positives:
            by_mod.setdefault(q.modality, []).append(q)
    mods = sorted(by_mod)
    for k in range(n_queries):
        pool = by_mod[mods[k % len(mods)]] if mods else []
        if not pool:
            continue
        q = pool[int(rng.integers(len(pool)))]
        queries.append((q, [store.product(pid) for pid in sorted(positives[q.id])]))
    return products, queries


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _html(store: ProductStore, products, queries, boxes) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>MOON store gallery</title>",
        "<style>body{font-family:sans-serif;margin:16px;background:#fafafa}h2{margin-top:28px}"
        ".row{display:flex;gap:6px;align-items:flex-start;margin:10px 0;padding:8px;background:#fff;border:1px solid #ddd}"
        ".meta{width:330px;font-size:12px;flex:none}.meta b{font-size:13px}.imgs{display:flex;gap:4px;flex-wrap:wrap}"
        ".arrow{font-size:28px;padding:40px 8px}</style>",
        f"<h1>{esc(str(store.root.name))}</h1><p>{esc(str(store.manifest.get('counts')))} — "
        "boxes: <span style='color:green'>clean</span>, <span style='color:red'>scene</span>, "
        "<span style='color:darkorange'>banner</span>, <span style='color:blue'>detail</span>, "
        "<span style='color:purple'>query</span>; cyan = detector boxes</p><h2>Listings</h2>",
    ]

    def product_cell(p: Product) -> str:
        attrs = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.attributes.items())
        imgs = "".join(
            f"<img src='{_data_uri(_thumb(store, x, boxes.get(_rel(store, x), [])))}' title='{esc(_rel(store, x))}'>"
            for x in p.images
        )
        group = f"<br>group {esc(p.group)}" if p.group else ""
        return (
            f"<div class='meta'><b>{esc(p.title)}</b><br>{esc(' > '.join(p.category))}<br><i>{esc(attrs)}</i>"
            f"<br>id {esc(p.id)}{group}</div><div class='imgs'>{imgs}</div>"
        )

    for p in products:
        parts.append(f"<div class='row'>{product_cell(p)}</div>")
    parts.append("<h2>Queries → purchased products</h2>")
    for q, bought in queries:
        imgs = "".join(f"<img src='{_data_uri(_thumb(store, x, boxes.get(_rel(store, x), [])))}'>" for x in q.images)
        text = esc(q.text) if q.text else "<i>(no text)</i>"
        cells = "".join(
            f"<div class='meta'><b>{esc(p.title)}</b><br>{esc(' > '.join(p.category))}</div>"
            f"<img src='{_data_uri(_thumb(store, p.images[0], boxes.get(_rel(store, p.images[0]), [])))}'>"
            for p in bought
            if p.images
        )
        parts.append(
            f"<div class='row'><div class='meta'><b>{esc(q.modality)} query</b> ({esc(q.split)})<br>“{text}”</div>"
            f"<div class='imgs'>{imgs}</div><div class='arrow'>→</div>{cells}</div>"
        )
    return "\n".join(parts) + "\n"


def _sheet(store: ProductStore, products, queries, boxes) -> Image.Image:
    rows: list[Image.Image] = []
    width = 8 + 6 * (THUMB + 4) + 300

    def row(label: str, thumbs: list[Image.Image]) -> Image.Image:
        r = Image.new("RGB", (width, THUMB + 8), (250, 250, 250))
        d = ImageDraw.Draw(r)
        y = 4
        for line in _wrap(label, 44)[:9]:
            d.text((4, y), line, fill=(0, 0, 0), font=font(12))
            y += 15
        x = 300
        for t in thumbs:
            if x + t.size[0] > width:
                break
            r.paste(t, (x, 4))
            x += t.size[0] + 4
        return r

    for p in products:
        attrs = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.attributes.items())
        label = f"{p.title}\n{' > '.join(p.category)}\n{attrs}"
        rows.append(row(label, [_thumb(store, x, boxes.get(_rel(store, x), [])) for x in p.images]))
    for q, bought in queries:
        thumbs = [_thumb(store, x, boxes.get(_rel(store, x), [])) for x in q.images]
        arrow = Image.new("RGB", (30, THUMB), (250, 250, 250))
        ImageDraw.Draw(arrow).text((4, THUMB // 2 - 10), "->", fill=(0, 0, 0), font=font(20))
        thumbs.append(arrow)
        thumbs += [_thumb(store, p.images[0], boxes.get(_rel(store, p.images[0]), [])) for p in bought if p.images]
        label = f"{q.modality} query ({q.split}): {q.text or '(no text)'}\n→ " + " | ".join(p.title for p in bought)
        rows.append(row(label, thumbs))
    sheet = Image.new("RGB", (width, sum(r.size[1] for r in rows) + 2 * len(rows) + 2), (200, 200, 200))
    y = 2
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.size[1] + 2
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            if len(line) + len(word) + 1 > width and line:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
    return lines


def write_gallery(
    store_dir: str | Path, out_file: str | Path, *, n: int = 12, n_queries: int | None = None, seed: int = 0
) -> Path:
    """Write a visual sample of ``n`` listings and ``n_queries`` (default ``n``) queries with their purchases.

    ``out_file`` ending in ``.html`` gives a self-contained page; ``.png`` a contact sheet. Returns the path.
    """
    out = Path(out_file)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise ConfigError(f"{out}: the gallery is written as .html or .png (got {suffix or 'no extension'})")
    if n < 0:
        raise ConfigError(f"n must be ≥ 0 (got {n})")
    store = ProductStore(store_dir)
    products, queries = _sample(store, n, n if n_queries is None else n_queries, seed)
    wanted = {_rel(store, x) for p in products for x in p.images}
    wanted |= {_rel(store, x) for q, bought in queries for x in [*q.images, *(p.images[0] for p in bought if p.images)]}
    boxes = _boxes_by_image(store, wanted)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        _sheet(store, products, queries, boxes).save(out, "PNG")
    else:
        out.write_text(_html(store, products, queries, boxes), encoding="utf-8")
    return out
