"""A 2-D map of embedding vectors coloured by a label (e.g. the top category)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import numpy as np


def project_2d(vectors: np.ndarray, *, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(n, d) → (n, 2). ``tsne`` (scikit-learn, after a 50-d PCA) or ``pca`` (numpy SVD)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty (n, d) array, got shape {x.shape}")
    x = x - x.mean(axis=0, keepdims=True)
    # PCA by SVD: deterministic up to sign, which we fix by making the largest loading positive
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    pcs = (u * s) * signs
    if method == "pca" or len(x) < 10:
        out = pcs[:, :2]
    elif method == "tsne":
        from sklearn.manifold import TSNE

        reduced = pcs[:, : min(50, pcs.shape[1])]
        perplexity = float(min(30, max(5, (len(x) - 1) // 4)))
        out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    else:
        raise ValueError(f"unknown projection method {method!r} (tsne or pca)")
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def plot_embedding_map(
    vectors: np.ndarray,
    labels: Sequence[str],
    out_png: str | os.PathLike,
    *,
    title: str = "Product vectors",
    method: str = "tsne",
    max_legend: int = 12,
) -> str:
    """Scatter the 2-D projection coloured by label (the ``max_legend`` most common, rest grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = project_2d(vectors, method=method)
    common = [name for name, _ in Counter(labels).most_common(max_legend)]
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    labels_arr = np.asarray(labels)
    other = ~np.isin(labels_arr, common)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=8, c="#cccccc", label="other", linewidths=0)
    for i, name in enumerate(common):
        m = labels_arr == name
        ax.scatter(xy[m, 0], xy[m, 1], s=10, color=cmap(i % 20), label=name, linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return str(out_png)
