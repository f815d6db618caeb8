"""Geometry of the learned detector's second (refining) pass.

The first pass finds a box on the whole image; the refining pass looks again at a square *window*
around that box (``context`` × its longer side), resized to the refine input, so a small product is
seen at several times the resolution. Windows may reach past the image border (the outside is filled
with neutral grey), which keeps the map between window fractions and image pixels one exact affine map
per axis: :func:`window_to_image` and :func:`image_to_window` are inverses.
"""

from __future__ import annotations

import math
import random

from PIL import Image

Box = tuple[float, float, float, float]

#: fill of window parts outside the image: the backbone's normalisation mean (≈ zero input)
FILL = (127, 127, 127)


def refine_window(box: Box, image_size: tuple[int, int], context: float = 2.0, min_frac: float = 0.15) -> Box:
    """Square window ``(x0, y0, x1, y1)`` in image pixels centred on ``box``: side ``context`` × the box's
    longer side, at least ``min_frac`` of the image's longer side (a tiny or empty box still gets a window)."""
    x0, y0, x1, y1 = box
    w, h = image_size
    side = max(context * max(x1 - x0, y1 - y0), min_frac * max(w, h), 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def crop_window(image: Image.Image, window: Box, size: int) -> Image.Image:
    """The ``window`` of ``image`` (may reach outside it) resized to ``size × size`` RGB."""
    return image.convert("RGB").transform(
        (size, size), Image.EXTENT, data=window, resample=Image.BILINEAR, fillcolor=FILL
    )


def window_to_image(box: Box, window: Box) -> Box:
    """A box in window fractions (0–1) → the same box in image pixels."""
    wx0, wy0, wx1, wy1 = window
    sx, sy = wx1 - wx0, wy1 - wy0
    return (wx0 + box[0] * sx, wy0 + box[1] * sy, wx0 + box[2] * sx, wy0 + box[3] * sy)


def image_to_window(box: Box, window: Box) -> Box:
    """A box in image pixels → window fractions (the inverse of :func:`window_to_image`)."""
    wx0, wy0, wx1, wy1 = window
    sx, sy = wx1 - wx0, wy1 - wy0
    return ((box[0] - wx0) / sx, (box[1] - wy0) / sy, (box[2] - wx0) / sx, (box[3] - wy0) / sy)


def jitter_box(box: Box, rng: random.Random, shift: float = 0.15, scale: float = 0.2) -> Box:
    """``box`` with its centre moved by N(0, ``shift`` × its size) and each side scaled by
    exp(N(0, ``scale``)): the kind of error a first pass makes, used to train the refining pass."""
    x0, y0, x1, y1 = box
    w, h = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    cx = (x0 + x1) / 2 + rng.gauss(0.0, shift) * w
    cy = (y0 + y1) / 2 + rng.gauss(0.0, shift) * h
    w *= math.exp(rng.gauss(0.0, scale))
    h *= math.exp(rng.gauss(0.0, scale))
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
