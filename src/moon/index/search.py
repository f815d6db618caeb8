"""Query an index: text and/or photos → embedder → nearest products (with their titles)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moon.data import ProductStore, Query
from moon.data.records import ImageRef
from moon.errors import ConfigError
from moon.index.vector_index import VectorIndex
from moon.models import Embedder

MAX_K = 100


@dataclass(frozen=True)
class SearchHit:
    """One ranked product: ``rank`` starts at 1; ``title`` is ``""`` when the store lacks the id."""

    rank: int
    id: str
    score: float
    title: str


def make_query(text: str | None = None, images: Sequence[ImageRef] = ()) -> Query:
    """A search query record; refuses an empty query."""
    text = text.strip() if text else None
    if not text and not images:
        raise ConfigError("give a query text, a query image, or both")
    return Query(id="request", text=text or None, images=list(images))


def search(
    index: VectorIndex,
    embedder: Embedder,
    query: Query,
    *,
    k: int = 10,
    store: ProductStore | None = None,
    max_k: int = MAX_K,
) -> list[SearchHit]:
    """Embed ``query`` and return its ``k`` nearest products (titles looked up in ``store``)."""
    if not 1 <= k <= max_k:
        raise ConfigError(f"k must be between 1 and {max_k}, got {k}")
    return nearest_products(index, embedder.encode_queries([query]), k=k, store=store, max_k=max_k)


def nearest_products(
    index: VectorIndex, vector: np.ndarray, *, k: int = 10, store: ProductStore | None = None, max_k: int = MAX_K
) -> list[SearchHit]:
    """The ``k`` nearest products of one query vector (``(dim,)`` or ``(1, dim)``), ranked."""
    if not 1 <= k <= max_k:
        raise ConfigError(f"k must be between 1 and {max_k}, got {k}")
    hits = index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), k)[0]
    out = []
    for rank, hit in enumerate(hits, start=1):
        title = ""
        if store is not None:
            try:
                title = store.product(hit.id).title
            except KeyError:
                title = ""
        out.append(SearchHit(rank=rank, id=hit.id, score=hit.score, title=title))
    return out
