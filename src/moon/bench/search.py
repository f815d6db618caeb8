"""Exact maximum-inner-product search: FAISS ``IndexFlatIP`` for large pools, numpy otherwise.

Both paths return the same ranking: equal scores are ordered by candidate position (lower index
first), so rankings — and every metric computed from them — are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Candidate pools at least this large go through FAISS (when it is installed).
FAISS_MIN_CANDIDATES = 50_000


def _top_k_numpy(queries: np.ndarray, candidates: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n, m = len(queries), len(candidates)
    idx = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        sim = queries[start : start + chunk] @ candidates.T  # (c, m)
        if k >= m:
            top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        else:
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            kth = np.take_along_axis(sim, top, axis=1).min(axis=1)
            # rows with ties at the cut: argpartition picks arbitrary tied candidates; take the first ones
            tied = np.nonzero((sim >= kth[:, None]).sum(axis=1) > k)[0]
            for row in tied:
                keep = np.nonzero(sim[row] >= kth[row])[0]
                top[row] = keep[np.lexsort((keep, -sim[row, keep]))][:k]
            top_scores = np.take_along_axis(sim, top, axis=1)
            top = np.take_along_axis(top, np.lexsort((top, -top_scores), axis=-1), axis=1)
        idx[start : start + len(sim)] = top
        scores[start : start + len(sim)] = np.take_along_axis(sim, top, axis=1)
    return idx, scores


def _top_k_faiss(queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(candidates)
    # ask for a margin so that ties at the cut can be re-ordered by position like the numpy path
    margin = min(len(candidates), k + 16)
    scores, idx = index.search(queries, margin)
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    for row in range(len(queries)):
        valid = idx[row] >= 0
        i, s = idx[row][valid], scores[row][valid]
        order = np.lexsort((i, -s))[:k]
        if margin < len(candidates) and s[order[-1]] <= s.min():
            # ties at the k-th score may reach past the margin: rank this row exactly
            i, s = _top_k_numpy(queries[row : row + 1], candidates, k, 1)
            out_idx[row], out_scores[row] = i[0], s[0]
            continue
        out_idx[row], out_scores[row] = i[order], s[order]
    return out_idx, out_scores


def exact_search(
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    *,
    exclude: Sequence[int] | None = None,
    use_faiss: bool | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidates by inner product.

    Args:
        queries: ``(n, d)`` float32 (L2-normalised rows make this cosine similarity).
        candidates: ``(m, d)`` float32.
        k: how many to return (clipped to the number of candidates, less one when excluding).
        exclude: per query, one candidate index to leave out (``-1`` for none) — e.g. the product
            itself in product→product retrieval.
        use_faiss: force FAISS on/off; by default FAISS is used for pools of at least
            :data:`FAISS_MIN_CANDIDATES` when it is importable.

    Returns:
        ``(indices, scores)``, both ``(n, k')``: candidate positions best first and their scores.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)
    n, m = len(queries), len(candidates)
    if n and m and queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != candidate dim {candidates.shape[1]}")
    extra = 1 if exclude is not None else 0
    k_out = max(0, min(k, m - extra))
    if n == 0 or k_out == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    k_search = min(k_out + extra, m)
    if use_faiss is None:
        use_faiss = m >= FAISS_MIN_CANDIDATES and _faiss_available()
    if use_faiss:
        idx, scores = _top_k_faiss(queries, candidates, k_search)
    else:
        idx, scores = _top_k_numpy(queries, candidates, k_search, chunk)
    if exclude is None:
        return idx, scores
    excl = np.asarray(exclude, dtype=np.int64).reshape(-1, 1)
    if len(excl) != n:
        raise ValueError(f"exclude has {len(excl)} entries for {n} queries")
    keep = idx != excl
    out_idx = np.empty((n, k_out), dtype=np.int64)
    out_scores = np.empty((n, k_out), dtype=np.float32)
    for row in range(n):
        out_idx[row] = idx[row][keep[row]][:k_out]
        out_scores[row] = scores[row][keep[row]][:k_out]
    return out_idx, out_scores


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
