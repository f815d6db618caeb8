import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from moon.bench.metrics import (
    accuracy,
    classification_metrics,
    macro_f1,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    recall_curve,
    retrieval_metrics,
)
from moon.bench.search import exact_search


def test_several_positives_hand_computed():
    ranked, rel = ["a", "b", "c", "d"], {"b", "d"}
    assert recall_at_k(ranked, rel, 1) == 0.0
    assert recall_at_k(ranked, rel, 2) == 0.5
    assert recall_at_k(ranked, rel, 5) == 1.0
    assert mrr_at_k(ranked, rel, 10) == 0.5
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(ranked, rel, 10) == pytest.approx(expected)
    assert ndcg_at_k(ranked, rel, 10) == pytest.approx(0.650920, abs=1e-6)


def test_positive_outside_cutoff_scores_zero_and_perfect_scores_one():
    ranked = [f"p{i}" for i in range(20)]
    assert recall_at_k(ranked, {"p15"}, 10) == 0.0
    assert mrr_at_k(ranked, {"p15"}, 10) == 0.0
    assert ndcg_at_k(ranked, {"p15"}, 10) == 0.0
    assert ndcg_at_k(ranked, {"p0", "p1"}, 10) == pytest.approx(1.0)
    # more positives than the cut-off: the ideal DCG only counts k of them
    assert ndcg_at_k(ranked, set(ranked[:15]), 10) == pytest.approx(1.0)


def test_empty_results():
    assert recall_at_k([], {"a"}, 10) == 0.0
    assert mrr_at_k([], {"a"}, 10) == 0.0
    assert ndcg_at_k([], {"a"}, 10) == 0.0
    assert retrieval_metrics([], []) == dict.fromkeys(["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"])
    assert classification_metrics([], []) == {"accuracy": None, "macro_f1": None}
    assert recall_curve([], [], [1, 10]) == {}
    with pytest.raises(ValueError):
        recall_at_k(["a"], set(), 1)


def test_mean_over_queries():
    m = retrieval_metrics([["a", "b"], ["c", "d"]], [{"a"}, {"d", "x"}])
    assert m["recall@1"] == pytest.approx((1 + 0) / 2)
    assert m["recall@5"] == pytest.approx((1 + 0.5) / 2)
    assert m["mrr@10"] == pytest.approx((1 + 0.5) / 2)


def test_ties_are_broken_by_candidate_position():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    cands = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    idx, scores = exact_search(q, cands, 3)
    assert idx.tolist() == [[1, 2, 3]]
    assert scores[0, 0] == scores[0, 1]
    ids = ["w", "x", "y", "z"]
    ranked = [ids[i] for i in idx[0]]
    # the later of two tied candidates is ranked second, deterministically
    assert mrr_at_k(ranked, {"y"}, 10) == 0.5
    assert recall_at_k(ranked, {"y"}, 1) == 0.0


def test_classification_hand_computed_and_matches_sklearn():
    y_true, y_pred = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    assert accuracy(y_true, y_pred) == 0.5
    assert macro_f1(y_true, y_pred) == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    rng = np.random.default_rng(0)
    t = rng.integers(0, 7, 200).astype(str).tolist()
    p = rng.integers(0, 9, 200).astype(str).tolist()
    assert macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
