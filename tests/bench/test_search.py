import numpy as np
import pytest

from moon.bench.search import exact_search


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_faiss_and_numpy_agree():
    rng = np.random.default_rng(0)
    q, c = _unit(rng.standard_normal((30, 16))), _unit(rng.standard_normal((500, 16)))
    i1, s1 = exact_search(q, c, 20, use_faiss=False)
    i2, s2 = exact_search(q, c, 20, use_faiss=True)
    assert (i1 == i2).all()
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    brute = np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :20]
    assert (i1 == brute).all()


@pytest.mark.parametrize("use_faiss", [False, True])
def test_ties_and_exclusion(use_faiss):
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    c = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    idx, _ = exact_search(q, c, 10, use_faiss=use_faiss)
    assert idx.shape == (2, 4)  # k clipped to the pool
    assert idx[0].tolist() == [0, 1, 3, 2]
    idx, _ = exact_search(q, c, 2, exclude=[1, 2], use_faiss=use_faiss)
    assert idx[0].tolist() == [0, 3]
    assert 2 not in idx[1].tolist() and len(idx[1]) == 2


def test_empty_inputs():
    idx, scores = exact_search(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32), 5)
    assert idx.shape == (0, 0)
    idx, _ = exact_search(np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32), 5)
    assert idx.shape == (2, 0)
    idx, _ = exact_search(np.ones((1, 4), np.float32), np.ones((1, 4), np.float32), 5, exclude=[0])
    assert idx.shape == (1, 0)


@pytest.mark.parametrize("use_faiss", [False, True])
def test_many_ties_match_a_stable_sort(use_faiss):
    rng = np.random.default_rng(1)
    q = rng.integers(0, 2, (40, 6)).astype(np.float32)
    c = rng.integers(0, 2, (300, 6)).astype(np.float32)  # scores are small integers: ties everywhere
    idx, scores = exact_search(q, c, 10, use_faiss=use_faiss, chunk=7)
    brute = np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :10]
    assert (idx == brute).all()
    np.testing.assert_array_equal(scores, np.take_along_axis(q @ c.T, brute, axis=1))
