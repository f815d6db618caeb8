"""The three FAISS index kinds MOON builds, and how one is chosen.

* ``exact``: ``IndexIDMap2(IndexFlatIP)`` — brute-force inner product (= cosine on unit vectors);
  the default up to ``exact_limit`` vectors (1,000,000).
* ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)`` — graph search, full vectors kept; the default above
  ``exact_limit`` up to ``hnsw_limit`` (10,000,000).
* ``ivfpq``: ``IndexIVFPQ`` — inverted lists + product quantisation (``pq_m`` codes of ``pq_nbits``
  bits per vector in memory), then an exact re-rank of the best ``rerank·k`` candidates with the
  full vectors memory-mapped from disk (:class:`moon.index.VectorIndex`); the default above
  ``hnsw_limit``, unless it cannot reach the recall target on held-out queries
  (:func:`moon.index.build_index_from_vectors`). Needs training on a sample.

All use the inner-product metric and carry int64 labels, so products can be added and removed.
"""

from __future__ import annotations

import math
from typing import Any

import faiss

from moon.errors import ConfigError
from moon.index.manifest import KINDS

EXACT_LIMIT = 1_000_000
HNSW_LIMIT = 10_000_000


def choose_kind(count: int, kind: str = "auto", *, exact_limit: int = EXACT_LIMIT, hnsw_limit: int = HNSW_LIMIT) -> str:
    """``kind`` itself when given, else ``exact`` / ``hnsw`` / ``ivfpq`` by the number of vectors."""
    if kind != "auto":
        if kind not in KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; choose auto, {', '.join(KINDS)}")
        return kind
    if count <= exact_limit:
        return "exact"
    return "hnsw" if count <= hnsw_limit else "ivfpq"


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for m in range(max(1, min(cap, n)), 0, -1):
        if n % m == 0:
            return m
    return 1


def default_params(kind: str, dim: int, count: int) -> dict[str, Any]:
    """Parameters of ``kind`` for ``count`` vectors of ``dim`` dimensions (all overridable)."""
    if kind == "exact":
        return {}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 128}
    if kind == "ivfpq":
        nlist = int(min(65536, max(1, 4 * math.sqrt(max(count, 1)))))
        nlist = max(1, min(nlist, count // 39 if count >= 39 else 1))
        # 2**nbits centroids per sub-quantiser want ≥ 39 training points each (FAISS's k-means rule)
        nbits = max(1, min(8, int(math.log2(max(count, 78) / 39))))
        return {
            "nlist": nlist,
            "pq_m": _largest_divisor_at_most(dim, max(1, min(128, dim // 16))),
            "pq_nbits": nbits,
            "nprobe": max(1, min(nlist, 32)),
            "rerank": 10,
            "train_size": min(count, max(256 * 40, 40 * nlist)),
        }
    raise ConfigError(f"unknown index kind {kind!r}")


def new_faiss_index(kind: str, dim: int, params: dict[str, Any]) -> faiss.Index:
    """An empty (untrained for ``ivfpq``) FAISS index that accepts ``add_with_ids``."""
    if kind == "exact":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(params["ef_construction"])
        inner.hnsw.efSearch = int(params["ef_search"])
        return faiss.IndexIDMap2(inner)
    if kind == "ivfpq":
        if dim % int(params["pq_m"]):
            raise ConfigError(f"pq_m={params['pq_m']} must divide the vector dimension {dim}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(
            quantizer,
            dim,
            int(params["nlist"]),
            int(params["pq_m"]),
            int(params["pq_nbits"]),
            faiss.METRIC_INNER_PRODUCT,
        )
        index.nprobe = int(params["nprobe"])
        return index
    raise ConfigError(f"unknown index kind {kind!r}")


def faiss_kind(index: faiss.Index) -> str | None:
    """The kind of a FAISS index read from a file, by its structure (what :func:`new_faiss_index`
    builds, with the inner-product metric); ``None`` for any other structure."""
    index = faiss.downcast_index(index)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if type(index) is faiss.IndexIVFPQ:
        return "ivfpq"
    if type(index) is faiss.IndexIDMap2:
        inner = type(faiss.downcast_index(index.index))
        return {faiss.IndexFlatIP: "exact", faiss.IndexHNSWFlat: "hnsw"}.get(inner)
    return None


def describe_faiss(index: faiss.Index) -> str:
    """``"an index of kind 'hnsw'"`` / ``"a FAISS IndexFlatL2 index, …"`` (one MOON never writes)."""
    kind = faiss_kind(index)
    if kind is not None:
        return f"an index of kind {kind!r}"
    index = faiss.downcast_index(index)
    inner = getattr(index, "index", None)
    name = type(index).__name__ + (f"({type(faiss.downcast_index(inner)).__name__})" if inner is not None else "")
    return f"a FAISS {name} index, which MOON does not write"


def apply_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    """Set the query-time knobs (``ef_search``, ``nprobe``) that a loaded index may not carry."""
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params.get("ef_search", 128))
    elif kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 16))
