import numpy as np

from moon.index import exact_topk, recall_at_k


def test_exact_topk_matches_full_sort_across_chunks():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(1000, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    want = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    np.testing.assert_array_equal(exact_topk(queries, vectors, 10, chunk=97), want)


def test_recall_known_answers():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(exact, exact, 4) == 1.0
    approx = np.array([[1, 2, 9, -1], [8, 7, 6, 5]])
    assert recall_at_k(approx, exact, 4) == (2 / 4 + 4 / 4) / 2
