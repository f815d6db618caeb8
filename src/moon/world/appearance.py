"""Make a product look like its attributes: the *product layer*, an RGBA array of the item alone.

``product_layer(sprite, variant, rng)`` recolours the drawing (colour), overlays a pattern, a
material texture and a style treatment, stamps a brand badge and repeats the item for packs. The
layer's alpha channel is the product's exact footprint, from which every true box is measured.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from moon.world.attributes import COLORS, Variant


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (the same on every machine)."""
    return ImageFont.load_default(size=max(6, int(size)))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / 255.0


def recolor(rgba: np.ndarray, color: str) -> np.ndarray:
    """Tint a drawing to ``color`` keeping its shading: ``(h, w, 4)`` uint8 → float32 RGB ``(h, w, 3)`` in 0–255."""
    lum = _luminance(rgba[..., :3].astype(np.float32))
    lum = 0.18 + 0.72 * lum  # keep outlines visible and highlights tinted
    c = np.asarray(COLORS[color], dtype=np.float32) / 255.0
    low = 2.0 * lum[..., None] * c
    high = 1.0 - 2.0 * (1.0 - lum[..., None]) * (1.0 - c)
    out = np.where(lum[..., None] < 0.5, low, high)
    return out * 255.0


def pattern_mask(h: int, w: int, pattern: str, rng: np.random.Generator) -> np.ndarray:
    """A 0/1 float mask ``(h, w)`` drawing the pattern (all zeros for ``solid``)."""
    if pattern == "solid":
        return np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(6.0, min(h, w) / float(rng.uniform(5.0, 8.0)))
    if pattern == "striped":
        angle = float(rng.choice([0.0, np.pi / 4, np.pi / 2, -np.pi / 4]))
        t = xx * np.cos(angle) + yy * np.sin(angle)
        return ((t % period) < period * 0.42).astype(np.float32)
    if pattern == "polka dot":
        cx = (xx % period) - period / 2
        cy = ((yy + (xx // period % 2) * period / 2) % period) - period / 2
        return ((cx * cx + cy * cy) < (period * 0.28) ** 2).astype(np.float32)
    if pattern == "plaid":
        a = ((xx % period) < period * 0.3).astype(np.float32)
        b = ((yy % period) < period * 0.3).astype(np.float32)
        return np.clip(0.6 * a + 0.6 * b, 0, 1)
    if pattern == "zigzag":
        tri = np.abs((xx % period) - period / 2)
        return (((yy + tri) % period) < period * 0.4).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def _smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    small = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8), "L").resize((w, h), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def material_texture(h: int, w: int, material: str, rng: np.random.Generator) -> np.ndarray:
    """A multiplicative shading field ``(h, w)`` around 1.0 that reads as the material."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if material == "wood":
        warp = _smooth_noise(h, w, rng, 4) * 6.0
        rings = np.sin((xx / max(w, 1) * 28.0 + warp) * np.pi)
        return 0.88 + 0.12 * rings
    if material == "metal":
        streaks = rng.random((h, 1)).astype(np.float32) * 0.12
        sheen = 0.25 * np.exp(-(((xx / max(w, 1)) - 0.35) ** 2) / 0.02)
        return 0.9 + streaks + sheen
    if material == "leather":
        grain = (
            np.asarray(
                Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(0.8)),
                np.float32,
            )
            / 255.0
        )
        return 0.8 + 0.25 * grain
    if material == "cotton":
        weave = np.sin(xx * 1.9) * np.sin(yy * 1.9)
        return 0.95 + 0.07 * weave
    if material == "glass":
        glare = 0.35 * np.exp(-(((xx / max(w, 1)) - 0.3) ** 2 + ((yy / max(h, 1)) - 0.25) ** 2) / 0.015)
        return 1.0 + glare
    if material == "plastic":
        gloss = 0.22 * np.exp(-(((xx / max(w, 1)) - 0.65) ** 2 + ((yy / max(h, 1)) - 0.3) ** 2) / 0.03)
        return 1.0 + gloss
    raise ValueError(f"unknown material {material!r}")


def _outline(alpha: np.ndarray, width: int) -> np.ndarray:
    """Alpha dilated by ``width`` px (max filter)."""
    img = Image.fromarray(alpha, "L").filter(ImageFilter.MaxFilter(2 * width + 1))
    return np.asarray(img)


def _apply_style(rgb: np.ndarray, alpha: np.ndarray, style: str) -> tuple[np.ndarray, np.ndarray]:
    if style == "vintage":
        lum = _luminance(rgb)[..., None] * 255.0
        sepia = lum * np.asarray([1.07, 0.9, 0.68], np.float32)
        rgb = 0.45 * rgb + 0.55 * sepia
    elif style == "minimalist":
        rgb = np.round(rgb / 85.0) * 85.0
    elif style == "sport":
        h = rgb.shape[0]
        band = slice(int(h * 0.42), int(h * 0.52))
        rgb[band] = rgb[band] * 0.25 + 255.0 * 0.75
    elif style in ("cute", "luxury"):
        pad = 4
        rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=255.0)
        alpha = np.pad(alpha, pad)
        ring = _outline(alpha, 3)
        edge = ring.astype(np.float32) / 255.0 * (1.0 - alpha.astype(np.float32) / 255.0)
        rim = np.asarray((255, 255, 255) if style == "cute" else (212, 175, 55), np.float32)
        rgb = rgb * (1.0 - edge[..., None]) + rim * edge[..., None]
        alpha = np.maximum(alpha, ring)
    return rgb, alpha


def _brand_badge(layer: Image.Image, brand: str) -> None:
    """Stamp a small logo badge with the brand name in the lower-middle of the item (in place)."""
    w, h = layer.size
    size = max(8, int(min(w, h) * 0.13))
    f = font(size)
    x0, y0, x1, y1 = f.getbbox(brand)
    tw, th = x1 - x0, y1 - y0
    bw, bh = tw + size // 2, th + size // 2
    cx, cy = w // 2, int(h * 0.68)
    box = (cx - bw // 2, cy - bh // 2, cx - bw // 2 + bw, cy - bh // 2 + bh)
    draw = ImageDraw.Draw(layer)
    draw.rounded_rectangle(box, radius=max(2, size // 4), fill=(255, 255, 255, 235), outline=(20, 20, 20, 255), width=1)
    draw.text((box[0] + size // 4 - x0, box[1] + size // 4 - y0), brand, font=f, fill=(15, 15, 15, 255))


def _pack(layer: np.ndarray, count: int) -> np.ndarray:
    """``count`` copies of the item side by side, overlapping a little, on one layer."""
    if count <= 1:
        return layer
    h, w = layer.shape[:2]
    step_x, step_y = int(w * 0.55), int(h * 0.12)
    out = Image.new("RGBA", (w + step_x * (count - 1), h + step_y * (count - 1)), (255, 255, 255, 0))
    item = Image.fromarray(layer, "RGBA")
    for i in reversed(range(count)):
        out.alpha_composite(item, (step_x * i, step_y * (count - 1 - i)))
    return np.asarray(out)


def product_layer(sprite: np.ndarray, variant: Variant, rng: np.random.Generator) -> np.ndarray:
    """The item as it looks with its attributes: ``(h, w, 4)`` uint8 RGBA (alpha = exact footprint)."""
    h, w = sprite.shape[:2]
    alpha = sprite[..., 3].copy()
    rgb = recolor(sprite, variant.color)
    mask = pattern_mask(h, w, variant.pattern, rng)
    if mask.any():
        contrast = np.full(3, 245.0 if sum(COLORS[variant.color]) < 380 else 30.0, np.float32)
        rgb = rgb * (1.0 - 0.55 * mask[..., None]) + contrast * (0.55 * mask[..., None])
    rgb = rgb * material_texture(h, w, variant.material, rng)[..., None]
    if variant.material == "glass":
        alpha = (alpha.astype(np.float32) * 0.85).astype(np.uint8)
    rgb, alpha = _apply_style(np.clip(rgb, 0, 255), alpha, variant.style)
    rgba = np.dstack([np.clip(rgb, 0, 255), alpha]).astype(np.uint8)
    rgba[alpha == 0, :3] = 255
    img = Image.fromarray(rgba, "RGBA")
    _brand_badge(img, variant.brand)
    count = int(variant.pack.split()[0])
    return _pack(np.asarray(img), count)
