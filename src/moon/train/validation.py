"""Validation during training: Recall@10 of val queries against every product (exact top-k)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from moon.data import Product, Query


@torch.no_grad()
def embed_items(
    model: Any, items: Sequence[Any], *, batch_size: int = 32, autocast: Callable[[], Any] = contextlib.nullcontext
) -> np.ndarray:
    """``(n, dim)`` float32 vectors of model inputs, through ``collate``/``forward`` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(items), batch_size):
            with autocast():
                out.append(model(model.collate(items[i : i + batch_size])).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def recall_at_k(query_vecs: np.ndarray, product_vecs: np.ndarray, relevant: Sequence[set[int]], k: int = 10) -> float:
    """Fraction of queries with a relevant product index among the top ``k`` by dot product."""
    if len(query_vecs) == 0:
        return 0.0
    scores = query_vecs @ product_vecs.T
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    hits = [bool(relevant[i] & set(top[i].tolist())) for i in range(len(top))]
    return float(np.mean(hits))


def validate_recall(
    model: Any,
    products: Sequence[Product],
    queries: Sequence[Query],
    positives: dict[str, set[str]],
    *,
    k: int = 10,
    batch_size: int = 32,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> float:
    """Recall@k of ``queries`` (each with purchases in ``positives``) over all ``products``."""
    index = {str(p.id): i for i, p in enumerate(products)}
    p_vecs = embed_items(model, model.build_product_inputs(products), batch_size=batch_size, autocast=autocast)
    q_vecs = embed_items(model, model.build_query_inputs(queries), batch_size=batch_size, autocast=autocast)
    relevant = [{index[p] for p in positives.get(q.id, ()) if p in index} for q in queries]
    return recall_at_k(q_vecs, p_vecs, relevant, k=k)
