"""Ranking and classification metrics, computed from explicit rankings.

Retrieval (binary relevance; ``relevant`` is the set of product ids purchased after the query):

* ``recall@k``  = |relevant ∩ top-k| / |relevant|  (the trec_eval definition: with several
  purchased products, finding one of two in the top 1 scores 0.5);
* ``mrr@k``     = 1 / rank of the first relevant item within the top k (0 when none);
* ``ndcg@k``    = DCG@k / IDCG@k with gain 1 and discount 1 / log2(rank + 1), the ideal ranking
  putting ``min(|relevant|, k)`` relevant items first.

Ties are broken before metrics see a ranking (:mod:`moon.bench.search` orders equal scores by
candidate position), so every metric here is a function of an ordered list. A query with an empty
ranking scores 0; queries with no relevant items are excluded by the caller (they cannot be scored).

Classification: ``accuracy`` and ``macro_f1`` (F1 averaged over every label that occurs as a truth
or a prediction, 0 where precision + recall = 0; the same as scikit-learn's ``average="macro"``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Hashable, Sequence

RETRIEVAL_METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")


def recall_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Fraction of the relevant items found in the first ``k`` of ``ranked``."""
    if not relevant:
        raise ValueError("recall is undefined for a query without relevant items")
    return len(set(ranked[:k]) & set(relevant)) / len(relevant)


def mrr_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Reciprocal rank of the first relevant item within the first ``k`` (0 if none)."""
    rel = set(relevant)
    for i, item in enumerate(ranked[:k]):
        if item in rel:
            return 1.0 / (i + 1)
    return 0.0


def ndcg_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Binary-gain nDCG over the first ``k`` items."""
    rel = set(relevant)
    if not rel:
        raise ValueError("nDCG is undefined for a query without relevant items")
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in rel)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), k)))
    return dcg / idcg


def retrieval_metrics(
    rankings: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]]
) -> dict[str, float | None]:
    """Mean Recall@1/5/10, MRR@10 and nDCG@10 over queries (``None`` for every metric when there are none).

    ``rankings[i]`` is query i's ranked candidate ids (best first), ``relevant[i]`` its relevant ids.
    """
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings but {len(relevant)} relevance sets")
    n = len(rankings)
    if n == 0:
        return dict.fromkeys(RETRIEVAL_METRICS)
    sums = dict.fromkeys(RETRIEVAL_METRICS, 0.0)
    for ranked, rel in zip(rankings, relevant, strict=True):
        ranked = list(ranked)
        for k in (1, 5, 10):
            sums[f"recall@{k}"] += recall_at_k(ranked, rel, k)
        sums["mrr@10"] += mrr_at_k(ranked, rel, 10)
        sums["ndcg@10"] += ndcg_at_k(ranked, rel, 10)
    return {name: value / n for name, value in sums.items()}


def recall_curve(
    rankings: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]], ks: Sequence[int]
) -> dict[int, float]:
    """Mean Recall@k for each k in ``ks`` (empty dict when there are no queries)."""
    if not rankings:
        return {}
    return {
        k: sum(recall_at_k(list(r), rel, k) for r, rel in zip(rankings, relevant, strict=True)) / len(rankings)
        for k in ks
    }


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float | None:
    """Fraction of exact matches (``None`` when there are no samples)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} truths but {len(y_pred)} predictions")
    if not y_true:
        return None
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float | None:
    """F1 averaged over the labels seen in ``y_true`` or ``y_pred`` (``None`` when there are no samples)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} truths but {len(y_pred)} predictions")
    if not y_true:
        return None
    tp: Counter[Hashable] = Counter(t for t, p in zip(y_true, y_pred, strict=True) if t == p)
    n_true: Counter[Hashable] = Counter(y_true)
    n_pred: Counter[Hashable] = Counter(y_pred)
    labels = set(n_true) | set(n_pred)
    # F1 = 2·tp / (2·tp + fp + fn) = 2·tp / (n_true + n_pred)
    total = sum(2 * tp[label] / (n_true[label] + n_pred[label]) for label in labels)
    return total / len(labels)


def classification_metrics(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> dict[str, float | None]:
    """``{"accuracy": ..., "macro_f1": ...}`` (both ``None`` when there are no samples)."""
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred)}
