"""A picture of predicted vs true boxes (``moon detect gallery``): PNG contact sheet or HTML page.

True boxes are drawn in green, predictions in red, with the IoU under each tile; images are taken
from the test split, the same number per kind.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image, ImageDraw

from moon.data import ImageLoadError, ProductStore, box_iou, load_image
from moon.errors import ConfigError, DataError
from moon.regions.base import Detector, full_image_box
from moon.regions.samples import iter_samples

TILE = 224
GREEN, RED = (0, 200, 0), (230, 0, 0)


def _tile(image: Image.Image, truth, pred) -> Image.Image:
    scale = TILE / max(image.size)
    im = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    for box, colour in ((truth, GREEN), (pred, RED)):
        if box is not None:
            draw.rectangle([v * scale for v in box], outline=colour, width=2)
    return im


def write_gallery(
    store_dir: str | os.PathLike,
    detector: Detector,
    out_file: str | os.PathLike,
    *,
    n_per_kind: int = 8,
    split: str | None = "test",
    columns: int = 6,
) -> Path:
    """Draw ``n_per_kind`` images per kind with true (green) and predicted (red) boxes; ``.png`` or ``.html``."""
    out = Path(out_file)
    if out.suffix.lower() not in (".png", ".html"):
        raise ConfigError(f"{out}: the gallery is written as .png or .html")
    store = ProductStore(store_dir)
    per_kind: dict[str, int] = {}
    tiles: list[tuple[str, Image.Image, str]] = []
    for s in iter_samples(store):
        if s.truth is None or (split is not None and s.split != split) or per_kind.get(s.kind, 0) >= n_per_kind:
            continue
        try:
            image = load_image(store.path(s.image))
        except ImageLoadError:
            continue
        per_kind[s.kind] = per_kind.get(s.kind, 0) + 1
        dets = detector.detect(image, s.title)
        pred = dets[0].box if dets else full_image_box(image.size)
        caption = f"{s.kind} IoU {box_iou(pred, s.truth):.2f}"
        tiles.append((s.kind, _tile(image, s.truth, pred), caption))
    if not tiles:
        raise DataError(f"{store.root}: no image with a true box to draw")
    tiles.sort(key=lambda t: t[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        rows = -(-len(tiles) // columns)
        sheet = Image.new("RGB", (columns * (TILE + 8), rows * (TILE + 24)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (_, tile, caption) in enumerate(tiles):
            x, y = (i % columns) * (TILE + 8), (i // columns) * (TILE + 24)
            sheet.paste(tile, (x, y))
            draw.text((x + 2, y + TILE + 4), caption, fill=(0, 0, 0))
        sheet.save(out)
    else:
        cells = []
        for _, tile, caption in tiles:
            buf = io.BytesIO()
            tile.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode()
            cells.append(
                f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
        page = (
            "<!doctype html><meta charset='utf-8'><title>detector gallery</title>"
            "<style>body{font-family:sans-serif}figure{display:inline-block;margin:4px}</style>"
            f"<h1>{html.escape(detector.name)}: predicted (red) vs true (green)</h1>" + "".join(cells)
        )
        out.write_text(page, encoding="utf-8")
    return out
