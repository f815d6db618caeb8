"""Compose listing and query pictures from a product layer, with the true product box of each.

Kinds (the ``kind`` column of ``boxes.parquet``):

* ``clean``  – main shot: the item on white with a soft shadow, its size attribute sets its scale;
* ``scene``  – the item small and off-centre among distractor objects on a real photo;
* ``banner`` – promotional picture: gradient, border, large sale text, price tag, watermark;
* ``detail`` – a zoom on part of the item;
* ``query``  – a shopper's photo: other background, rotation/angle, lighting, blur, heavy JPEG.

Each function returns a :class:`Shot` whose ``box`` is the bounding box (x0, y0 inclusive; x1, y1
exclusive) of the product's footprint *as pasted* (alpha > 0 inside the image) and ``footprint``
that boolean mask, so the box is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from moon.world.appearance import font, recolor
from moon.world.attributes import COLORS
from moon.world.textures import TEXTURE_KINDS, photo_crop, texture

SIDE = 224

SALE_WORDS = ("SALE", "HOT", "NEW", "-50%", "-30%", "BUY 1 GET 1", "LIMITED", "TOP", "BEST", "DEAL", "2 FOR 1", "FLASH")


@dataclass
class Shot:
    """A composed picture: RGB ``image``, the product ``box`` and ``footprint`` (bool ``(h, w)``)."""

    image: Image.Image
    box: tuple[int, int, int, int]
    footprint: np.ndarray
    kind: str
    jpeg_quality: int = 88


def _scaled(layer: np.ndarray, longest: float, squeeze: float = 1.0) -> Image.Image:
    h, w = layer.shape[:2]
    s = longest / max(h, w)
    size = (max(2, round(w * s * squeeze)), max(2, round(h * s)))
    return Image.fromarray(layer, "RGBA").resize(size, Image.BILINEAR)


def _paste(canvas: Image.Image, item: Image.Image, x: int, y: int) -> np.ndarray:
    """Alpha-composite ``item`` at (x, y) (may hang off the edges); returns its footprint on the canvas."""
    W, H = canvas.size
    w, h = item.size
    foot = np.zeros((H, W), bool)
    cx0, cy0, cx1, cy1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if cx0 >= cx1 or cy0 >= cy1:
        return foot
    part = item.crop((cx0 - x, cy0 - y, cx1 - x, cy1 - y))
    canvas.paste(part, (cx0, cy0), part)
    foot[cy0:cy1, cx0:cx1] = np.asarray(part.getchannel("A")) > 0
    return foot


def box_of(footprint: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a non-empty boolean mask."""
    ys = np.flatnonzero(footprint.any(axis=1))
    xs = np.flatnonzero(footprint.any(axis=0))
    if len(xs) == 0:
        raise ValueError("the product footprint is empty")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _shot(canvas: Image.Image, foot: np.ndarray, kind: str, quality: int = 88) -> Shot:
    return Shot(canvas.convert("RGB"), box_of(foot), foot, kind, quality)


def _shadow(canvas: Image.Image, x: int, y: int, w: int, h: int) -> None:
    sh = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(sh).ellipse((x + w * 0.1, y + h * 0.9, x + w * 0.9, y + h * 1.04), fill=70)
    sh = sh.filter(ImageFilter.GaussianBlur(5))
    canvas.paste((120, 120, 120), (0, 0), sh)


def clean_shot(layer: np.ndarray, scale: float, rng: np.random.Generator) -> Shot:
    """The item centred on white, longest side ``scale × SIDE``."""
    canvas = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    item = _scaled(layer, SIDE * scale * float(rng.uniform(0.95, 1.03)))
    x = (SIDE - item.size[0]) // 2 + int(rng.integers(-4, 5))
    y = (SIDE - item.size[1]) // 2 + int(rng.integers(-4, 5))
    _shadow(canvas, x, y, item.size[0], item.size[1])
    return _shot(canvas, _paste(canvas, item, x, y), "clean", 92)


def _background(
    rng: np.random.Generator, photos: list[np.ndarray], surfaces: list[np.ndarray], photo_p: float
) -> Image.Image:
    """A crop of a real photo (probability ``photo_p``) or one of the pre-made surfaces, jittered."""
    if photos and (not surfaces or rng.random() < photo_p):
        arr = photo_crop(photos[int(rng.integers(len(photos)))], SIDE, SIDE, rng)
    elif surfaces:
        arr = surfaces[int(rng.integers(len(surfaces)))]
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        if rng.random() < 0.5:
            arr = arr[::-1]
        arr = np.clip(arr.astype(np.float32) * float(rng.uniform(0.85, 1.12)), 0, 255).astype(np.uint8)
    else:
        arr = texture(SIDE, SIDE, TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))], rng)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def surface_bank(rng: np.random.Generator, per_kind: int = 4) -> list[np.ndarray]:
    """Pre-made procedural surfaces (``per_kind`` of each texture kind), reused across pictures."""
    return [texture(SIDE, SIDE, kind, rng) for kind in TEXTURE_KINDS for _ in range(per_kind)]


def _distractor(sprite: np.ndarray, longest: float, rng: np.random.Generator) -> Image.Image:
    item = _scaled(sprite, longest)
    if rng.random() < 0.5:
        colors = list(COLORS)
        arr = np.asarray(item)
        rgb = recolor(arr, colors[int(rng.integers(len(colors)))])
        item = Image.fromarray(np.dstack([np.clip(rgb, 0, 255), arr[..., 3]]).astype(np.uint8), "RGBA")
    return item


def _place_distractors(
    canvas: Image.Image, distractors: list[np.ndarray], rng: np.random.Generator, lo: float, hi: float
) -> None:
    for sprite in distractors:
        item = _distractor(sprite, SIDE * float(rng.uniform(lo, hi)), rng)
        x = int(rng.integers(-item.size[0] // 3, SIDE - item.size[0] // 2))
        y = int(rng.integers(-item.size[1] // 3, SIDE - item.size[1] // 2))
        _paste(canvas, item, x, y)


def _off_centre(half: int, size: int, rng: np.random.Generator) -> int:
    """A start coordinate putting an item of ``size`` px in the first (0) or second (1) half of the side."""
    mid = SIDE // 2 - size // 2
    lo, hi = (2, max(3, mid)) if half == 0 else (mid, max(mid + 1, SIDE - size - 2))
    return int(rng.integers(lo, hi))


def scene_shot(
    layer: np.ndarray,
    photos: list[np.ndarray],
    surfaces: list[np.ndarray],
    distractors: list[np.ndarray],
    rng: np.random.Generator,
    lookalike: np.ndarray | None = None,
) -> Shot:
    """The item small (18–38 % of the side) and off-centre, among distractors, on a real photo or surface.

    ``lookalike`` (RGBA) is pasted as is, e.g. the same model in another colour: the item the title
    describes is then only one of two similar objects.
    """
    canvas = _background(rng, photos, surfaces, 0.75).convert("RGBA")
    _place_distractors(canvas, distractors, rng, 0.18, 0.45)
    if lookalike is not None:
        twin = _scaled(lookalike, SIDE * float(rng.uniform(0.2, 0.35)))
        _paste(
            canvas, twin, int(rng.integers(0, SIDE - twin.size[0] + 1)), int(rng.integers(0, SIDE - twin.size[1] + 1))
        )
    item = _scaled(layer, SIDE * float(rng.uniform(0.18, 0.38)))
    w, h = item.size
    # off-centre: pick a quadrant, then a position inside it
    x = _off_centre(int(rng.integers(2)), w, rng)
    y = _off_centre(int(rng.integers(2)), h, rng)
    foot = _paste(canvas, item, x, y)
    canvas = canvas.convert("RGB")
    arr = np.asarray(canvas, np.float32) * float(rng.uniform(0.85, 1.1)) + rng.uniform(-8, 8, 3)
    return _shot(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), foot, "scene", 85)


def _gradient(rng: np.random.Generator) -> Image.Image:
    colors = list(COLORS.values())
    a = np.asarray(colors[int(rng.integers(len(colors)))], np.float32)
    b = np.asarray(colors[int(rng.integers(len(colors)))], np.float32) * 0.6 + 100
    t = np.linspace(0, 1, SIDE, dtype=np.float32)[:, None, None]
    arr = a * (1 - t) + b * t
    return Image.fromarray(np.clip(np.broadcast_to(arr, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8), "RGB")


def banner_shot(layer: np.ndarray, shop: str, price: str, rng: np.random.Generator) -> Shot:
    """A promotional picture: border, big sale words, a price tag and a shop watermark over everything."""
    canvas = _gradient(rng).convert("RGBA")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 12))):  # confetti
        cx, cy = (int(v) for v in rng.integers(0, SIDE, 2))
        r = int(rng.integers(3, 14))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255, int(rng.integers(40, 120))))
    border = int(rng.integers(5, 12))
    item = _scaled(layer, SIDE * float(rng.uniform(0.45, 0.62)))
    left = rng.random() < 0.5
    x = border + 6 if left else SIDE - border - 6 - item.size[0]
    y = int(rng.integers(border + 30, max(border + 31, SIDE - border - item.size[1] - 4)))
    foot = _paste(canvas, item, x, y)
    draw = ImageDraw.Draw(canvas)
    word = SALE_WORDS[int(rng.integers(len(SALE_WORDS)))]
    big = font(int(rng.integers(30, 44)))
    tx = border + 4
    draw.text((tx + 2, border + 2), word, font=big, fill=(0, 0, 0, 160))
    draw.text((tx, border), word, font=big, fill=(255, 230, 40, 255))
    tag_font = font(18)
    tw = int(tag_font.getlength(price)) + 12
    px = (SIDE - border - 6 - tw) if left else border + 6
    py = int(SIDE * float(rng.uniform(0.45, 0.75)))
    draw.rounded_rectangle((px, py, px + tw, py + 30), radius=8, fill=(215, 20, 30, 235))
    draw.text((px + 6, py + 5), price, font=tag_font, fill=(255, 255, 255, 255))
    edge = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw.rectangle((0, 0, SIDE - 1, SIDE - 1), outline=edge + (255,), width=border)
    mark = Image.new("RGBA", (SIDE * 2, SIDE * 2), (0, 0, 0, 0))
    md = ImageDraw.Draw(mark)
    for row in range(0, SIDE * 2, 48):
        md.text(((row // 48 % 2) * 40, row), (shop + "   ") * 4, font=font(16), fill=(255, 255, 255, 70))
    mark = mark.rotate(30, resample=Image.BILINEAR).crop((SIDE // 2, SIDE // 2, SIDE * 3 // 2, SIDE * 3 // 2))
    canvas.alpha_composite(mark)
    return _shot(canvas, foot, "banner", 85)


def detail_shot(layer: np.ndarray, rng: np.random.Generator) -> Shot:
    """A zoom: the item at 1.6–2.6× the picture size, framed around one of its own pixels."""
    bg = np.asarray(texture(SIDE, SIDE, "studio", rng))
    canvas = Image.fromarray(bg, "RGB").convert("RGBA")
    item = _scaled(layer, SIDE * float(rng.uniform(1.6, 2.6)))
    alpha = np.asarray(item.getchannel("A"))
    ys, xs = np.nonzero(alpha > 128)
    if len(xs) == 0:
        ys, xs = np.nonzero(alpha > 0)
    k = int(rng.integers(len(xs)))
    ax, ay = int(xs[k]), int(ys[k])
    x = SIDE // 2 - ax + int(rng.integers(-SIDE // 5, SIDE // 5 + 1))
    y = SIDE // 2 - ay + int(rng.integers(-SIDE // 5, SIDE // 5 + 1))
    foot = _paste(canvas, item, x, y)
    img = canvas.convert("RGB").filter(ImageFilter.UnsharpMask(radius=2, percent=60, threshold=2))
    return _shot(img, foot, "detail", 88)


def query_photo(
    layer: np.ndarray,
    photos: list[np.ndarray],
    surfaces: list[np.ndarray],
    distractors: list[np.ndarray],
    rng: np.random.Generator,
) -> Shot:
    """A shopper's photo of the item: other background, rotation and squeeze, lighting, blur, noise, low JPEG quality."""
    canvas = _background(rng, photos, surfaces, 0.5).convert("RGBA")
    _place_distractors(canvas, distractors, rng, 0.2, 0.4)
    item = _scaled(layer, SIDE * float(rng.uniform(0.35, 0.7)), squeeze=float(rng.uniform(0.8, 1.15)))
    item = item.rotate(float(rng.uniform(-35, 35)), resample=Image.BICUBIC, expand=True)
    w, h = item.size
    x = int(rng.integers(min(2, SIDE - w), max(3, SIDE - w - 2)))
    y = int(rng.integers(min(2, SIDE - h), max(3, SIDE - h - 2)))
    foot = _paste(canvas, item, x, y)
    arr = np.asarray(canvas.convert("RGB"), np.float32)
    gain = float(rng.uniform(0.6, 1.25))
    cast = rng.uniform(-18, 18, 3)
    yy = np.linspace(-1, 1, SIDE, dtype=np.float32)
    vignette = 1.0 - 0.25 * float(rng.random()) * (yy[:, None] ** 2 + yy[None, :] ** 2)
    arr = arr * gain * vignette[..., None] + cast
    arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * float(rng.uniform(0, 8))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    blur = float(rng.uniform(0, 1.6))
    if blur > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return Shot(img, box_of(foot), foot, "query", int(rng.integers(30, 75)))
