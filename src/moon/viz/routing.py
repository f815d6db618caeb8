"""The MoE routing map: for each layer, the share of each aspect's tokens sent to each expert."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def plot_routing_map(
    layers: Mapping[str, np.ndarray],
    aspects: Sequence[str],
    experts: Sequence[str],
    out_png: str | os.PathLike,
    *,
    title: str = "Guided MoE routing (share of each aspect's tokens per expert)",
) -> str:
    """``layers``: layer name → (n_aspects, n_experts) token counts. Rows are normalised to shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(layers)
    if not names:
        raise ValueError("no layers to plot")
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        counts = np.asarray(layers[name], dtype=np.float64)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(aspects)), aspects, fontsize=7)
        for i in range(share.shape[0]):
            for j in range(share.shape[1]):
                if counts[i].sum() > 0:
                    ax.text(
                        j,
                        i,
                        f"{share[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if share[i, j] < 0.6 else "black",
                    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return str(out_png)
