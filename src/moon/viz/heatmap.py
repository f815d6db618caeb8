"""Overlay a coarse heat map (e.g. per vision patch) on an image."""

from __future__ import annotations

import numpy as np
from PIL import Image


def overlay_heatmap(image: Image.Image, heat: np.ndarray, *, alpha: float = 0.5) -> Image.Image:
    """Blend a (h, w) heat map, normalised to [0, 1] and upsampled, over an RGB image (jet colours)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps

    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 2 or h.size == 0:
        raise ValueError(f"heat map must be a non-empty 2-D array, got shape {h.shape}")
    h = h - h.min()
    if h.max() > 0:
        h = h / h.max()
    rgba = (colormaps["jet"](h) * 255).astype(np.uint8)
    heat_img = Image.fromarray(rgba[..., :3]).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat_img, alpha)
