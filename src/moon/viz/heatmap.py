"""Heat maps (e.g. per vision patch) over images: one blended image, or a grid with a colour bar."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


def overlay_heatmap(image: Image.Image, heat: np.ndarray, *, alpha: float = 0.5) -> Image.Image:
    """Blend a (h, w) heat map, stretched to [0, 1] (min → 0, max → 1) and upsampled, over an RGB
    image (jet colours). For a fixed colour scale with a colour bar use :func:`plot_heatmaps`."""
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


def plot_heatmaps(
    panels: Sequence[tuple[Image.Image, np.ndarray, str]],
    out_png: str | os.PathLike,
    *,
    cols: int = 4,
    alpha: float = 0.5,
    scale_label: str = "contribution (1 = the image's strongest patch)",
    cmap: str = "jet",
) -> str:
    """A grid of images, each with its ``(h, w)`` heat map in [0, 1] laid over it on one fixed
    colour scale (0 → 1, no per-image stretching), and a colour bar saying what the colours mean.
    ``panels``: (image, heat, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("no heat maps to plot")
    from moon.viz.axes import text_fonts

    # WenQuanYi ships weight "Book" (500): matplotlib logs a "findfont: … now using 500" per use
    quiet = logging.getLogger("matplotlib.font_manager")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with plt.rc_context({"font.family": text_fonts()}):
            return _plot_heatmaps(panels, out_png, cols, alpha, scale_label, cmap)
    finally:
        quiet.setLevel(level)


def _plot_heatmaps(panels, out_png, cols, alpha, scale_label, cmap) -> str:  # noqa: ANN001
    import matplotlib
    import matplotlib.pyplot as plt

    cols = max(1, min(cols, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.9, 2.9 * rows), squeeze=False)
    mappable = None
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, heat, caption) in zip(axes.flat, panels, strict=False):
        h = np.asarray(heat, dtype=np.float64)
        if h.ndim != 2 or h.size == 0:
            raise ValueError(f"heat map must be a non-empty 2-D array, got shape {h.shape}")
        w_px, h_px = image.size
        ax.imshow(image.convert("RGB"), extent=(0, w_px, h_px, 0))
        mappable = ax.imshow(
            np.clip(h, 0, 1), cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, extent=(0, w_px, h_px, 0),
            interpolation="bilinear",
        )  # fmt: skip
        ax.set_title(caption if len(caption) <= 34 else caption[:33] + "…", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.915, 0.15, 0.018, 0.7))
    # the bar at full strength (the maps are blended over their images at ``alpha``)
    solid = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0), cmap=mappable.get_cmap())
    bar = fig.colorbar(solid, cax=cax)
    bar.set_label(scale_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return str(out_png)
