"""Exact top-k by chunked matrix products, and Recall@k of an approximate result against it."""

from __future__ import annotations

import numpy as np


def exact_topk(
    queries: np.ndarray, vectors: np.ndarray, k: int, *, chunk: int = 65536, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Row indices of the ``k`` largest inner products of each query.

    Args:
        queries: float32 ``(q, dim)``.
        vectors: float32 ``(n, dim)`` (a ``np.memmap`` works; it is read in chunks of ``chunk`` rows).
        exclude: row indices never returned (e.g. vectors held out of an index).
    Returns:
        int64 ``(q, min(k, n - len(exclude)))``, best first.
    """
    n = vectors.shape[0]
    skip = np.unique(np.asarray(exclude, dtype=np.int64)) if exclude is not None else np.zeros(0, np.int64)
    k = min(k, n - len(skip))
    best_scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, n, chunk):
        block = np.asarray(vectors[start : start + chunk], dtype=np.float32)
        scores = queries @ block.T
        local = skip[(skip >= start) & (skip < start + block.shape[0])] - start
        if len(local):
            scores[:, local] = -np.inf
        ids = np.broadcast_to(np.arange(start, start + block.shape[0], dtype=np.int64), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        keep = np.argpartition(-all_scores, min(k, all_scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, keep, axis=1)
        best_ids = np.take_along_axis(all_ids, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean over queries of ``|approx[:k] ∩ exact[:k]| / |exact[:k]|`` (ids; -1 in ``approx`` = no hit)."""
    if exact.shape[0] == 0:
        return 1.0
    total = 0.0
    for a, e in zip(approx[:, :k], exact[:, :k], strict=True):
        truth = set(e.tolist())
        total += len(truth & set(a.tolist())) / max(1, len(truth))
    return total / exact.shape[0]
