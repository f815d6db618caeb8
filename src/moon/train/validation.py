"""Validation during training: val queries against every product (exact top-k), two scores.

* ``val_hit@10``    — fraction of val queries with at least one purchased product in the top 10;
* ``val_recall@10`` — fraction of the purchased products found in the top 10, averaged over queries:
  the benchmark's ``recall@10`` (:func:`moon.bench.metrics.recall_at_k`, trec_eval's definition).

They differ only for queries with several purchases (one of two found: hit 1, recall 0.5). Queries
without a purchased product in the catalog cannot be scored and are left out of both, as in
:mod:`moon.bench`. Rankings come from :func:`moon.bench.search.exact_search` (ties by position).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moon.bench.metrics import mrr_at_k, recall_at_k
from moon.bench.search import exact_search
from moon.data import Product, Query
from moon.models.encoding import encode_items

HIT_KEY, RECALL_KEY = "val_hit@10", "val_recall@10"


def hit_and_recall_at_k(
    query_vecs: np.ndarray, product_vecs: np.ndarray, relevant: Sequence[set[int]], k: int = 10
) -> dict[str, float] | None:
    """``{"val_hit@k": …, "val_recall@k": …}`` over the queries that have a relevant product index.

    ``query_vecs`` ``(n, d)``, ``product_vecs`` ``(m, d)``, ``relevant[i]`` the product indices query i
    bought. ``None`` when no query can be scored.
    """
    rows = [i for i, rel in enumerate(relevant) if rel]
    if not rows or len(product_vecs) == 0:
        return None
    top, _ = exact_search(query_vecs[rows], product_vecs, k)
    ranked = [list(map(int, t)) for t in top]
    rel = [relevant[i] for i in rows]
    # a hit: the first relevant item is within the top k (its reciprocal rank is > 0)
    hit = float(np.mean([mrr_at_k(r, s, k) > 0 for r, s in zip(ranked, rel, strict=True)]))
    recall = float(np.mean([recall_at_k(r, s, k) for r, s in zip(ranked, rel, strict=True)]))
    return {f"val_hit@{k}": hit, f"val_recall@{k}": recall}


def validate_retrieval(
    model: Any,
    products: Sequence[Product],
    queries: Sequence[Query],
    positives: dict[str, set[str]],
    *,
    k: int = 10,
    batch_size: int = 32,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, float] | None:
    """Hit@k and Recall@k (see the module docstring) of ``queries`` over all ``products``."""
    index = {str(p.id): i for i, p in enumerate(products)}
    p_vecs = encode_items(model, model.build_product_inputs(products), batch_size=batch_size, autocast=autocast)
    q_vecs = encode_items(model, model.build_query_inputs(queries), batch_size=batch_size, autocast=autocast)
    relevant = [{index[p] for p in positives.get(q.id, ()) if p in index} for q in queries]
    return hit_and_recall_at_k(q_vecs, p_vecs, relevant, k=k)
