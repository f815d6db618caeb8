"""Backgrounds: crops of real photos and procedural textures (wood table, fabric, marble, tiles, studio).

Every function takes a ``numpy.random.Generator`` and returns an RGB uint8 array ``(h, w, 3)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

TEXTURE_KINDS = ("wood", "fabric", "marble", "tiles", "studio", "carpet")


def _noise(h: int, w: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    small = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small, "L").resize((w, h), Image.BICUBIC), np.float32) / 255.0


def _tint(rng: np.random.Generator, base: tuple[int, int, int], spread: int = 25) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.integers(-spread, spread + 1, 3), 0, 255)


def texture(h: int, w: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A procedural surface of ``kind`` (one of :data:`TEXTURE_KINDS`)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "wood":
        base = _tint(rng, (150, 100, 60))
        warp = _noise(h, w, rng, 5) * 8.0
        grain = 0.82 + 0.18 * np.sin((yy / h * float(rng.uniform(18, 40)) + warp) * np.pi)
        planks = ((xx // max(1, w // int(rng.integers(2, 5)))) % 2) * 0.06
        return np.clip(base * (grain - planks)[..., None], 0, 255).astype(np.uint8)
    if kind == "fabric":
        base = _tint(rng, (int(rng.integers(60, 220)), int(rng.integers(60, 220)), int(rng.integers(60, 220))), 10)
        weave = 0.9 + 0.1 * np.sin(xx * 2.2) * np.sin(yy * 2.2) + 0.08 * (_noise(h, w, rng, 12) - 0.5)
        return np.clip(base * weave[..., None], 0, 255).astype(np.uint8)
    if kind == "marble":
        base = _tint(rng, (225, 222, 215), 10)
        veins = np.abs(np.sin((xx + yy) / w * 6.0 + _noise(h, w, rng, 6) * 9.0)) ** 0.3
        return np.clip(base * (0.72 + 0.28 * veins)[..., None], 0, 255).astype(np.uint8)
    if kind == "tiles":
        base = _tint(rng, (200, 200, 195), 30)
        cell = int(rng.integers(28, 60))
        grout = (((xx % cell) < 2) | ((yy % cell) < 2)).astype(np.float32)
        shade = 0.92 + 0.08 * _noise(h, w, rng, 8)
        return np.clip(base * (shade * (1 - 0.45 * grout))[..., None], 0, 255).astype(np.uint8)
    if kind == "studio":
        top, bottom = _tint(rng, (235, 235, 240), 15), _tint(rng, (175, 180, 190), 30)
        t = (yy / max(h - 1, 1))[..., None]
        return np.clip(top * (1 - t) + bottom * t, 0, 255).astype(np.uint8)
    if kind == "carpet":
        base = _tint(rng, (int(rng.integers(80, 200)), int(rng.integers(60, 160)), int(rng.integers(60, 160))), 10)
        fibre = (
            np.asarray(
                Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(1.0)),
                np.float32,
            )
            / 255.0
        )
        return np.clip(base * (0.75 + 0.45 * fibre)[..., None], 0, 255).astype(np.uint8)
    raise ValueError(f"unknown texture {kind!r}")


def photo_crop(photo: np.ndarray, h: int, w: int, rng: np.random.Generator, min_frac: float = 0.35) -> np.ndarray:
    """A random crop of a photo (random scale, position, mirror, light jitter) resized to ``(h, w)``."""
    ph, pw = photo.shape[:2]
    frac = float(rng.uniform(min_frac, 1.0))
    ch = max(8, int(min(ph, pw * h / w) * frac))
    cw = max(8, int(ch * w / h))
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.BILINEAR)
    arr = np.asarray(crop, np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr * float(rng.uniform(0.8, 1.15)) + rng.uniform(-12, 12, 3)
    return np.clip(arr, 0, 255).astype(np.uint8)
