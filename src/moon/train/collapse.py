"""Embedding-collapse monitor: the mean cosine between a step's product vectors, and a warning
when it stays near 1 (every product mapped to almost the same vector).

A collapsed model sits at the chance loss ``log(candidates)`` with vanishing gradients and does not
recover by itself; training from a randomly initialised backbone on an image-heavy mix is the usual
cause (docs/training.md, "When the loss sits at log(candidates)").
"""

from __future__ import annotations

import warnings

import torch


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of the rows of ``(n, d)`` ``vectors`` (``nan`` for n < 2)."""
    n = vectors.shape[0]
    if n < 2:
        return float("nan")
    v = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
    total = v.sum(0)
    # sum over all ordered pairs i != j of <v_i, v_j> = |sum v|^2 - sum |v_i|^2
    off = float(total @ total) - float((v * v).sum())
    return off / (n * (n - 1))


class CollapseWatch:
    """Warns once when the product cosine is at least ``threshold`` for ``patience`` logged steps
    in a row after ``start`` (the warm-up: a fresh model starts anywhere)."""

    def __init__(self, threshold: float = 0.99, patience: int = 10, start: int = 0):
        self.threshold = threshold
        self.patience = patience
        self.start = start
        self.run = 0
        self.warned = False

    def update(self, step: int, cosine: float) -> bool:
        """Feed step ``step``'s cosine; returns True (and warns) the first time collapse is seen."""
        if step <= self.start or not cosine == cosine:  # nan: fewer than 2 products
            return False
        self.run = self.run + 1 if cosine >= self.threshold else 0
        if self.run >= self.patience and not self.warned:
            self.warned = True
            warnings.warn(
                f"embeddings have collapsed: the mean cosine between the batch's product vectors has been "
                f">= {self.threshold} for {self.run} steps (now {cosine:.4f}), so the loss sits at "
                "log(candidates) and the model stops learning. Start from pretrained weights, lower "
                "optim.lr, or give more weight to text/multimodal queries (data.modality_mix); "
                "see docs/training.md",
                RuntimeWarning,
                stacklevel=2,
            )
            return True
        return False
