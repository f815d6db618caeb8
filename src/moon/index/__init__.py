"""Vector indexes of product stores (FAISS): build, add/remove products, search.

``build_index(embedder, store, out_dir)`` writes an index directory (see :mod:`moon.index.manifest`);
``VectorIndex.open(dir)`` loads it (``VectorIndex.edit(dir)`` under the index's lock, to change it);
every write is atomic (:mod:`moon.index.atomic`); :func:`search` answers a text/photo query with ranked products.
"""

from moon.index.atomic import IndexConflictError, IndexSaveError, check_index_target, index_lock
from moon.index.build import (
    add_products,
    build_index,
    build_index_from_vectors,
    check_embedder,
    index_store_dir,
    load_index_embedder,
    measure_recall,
)
from moon.index.kinds import EXACT_LIMIT, HNSW_LIMIT, choose_kind, default_params
from moon.index.manifest import KINDS, IndexFormatError, IndexManifest, read_manifest
from moon.index.recall import exact_topk, recall_at_k
from moon.index.search import MAX_K, SearchHit, make_query, search
from moon.index.vector_index import Neighbour, VectorIndex

__all__ = [
    "EXACT_LIMIT",
    "HNSW_LIMIT",
    "KINDS",
    "MAX_K",
    "IndexConflictError",
    "IndexFormatError",
    "IndexSaveError",
    "IndexManifest",
    "Neighbour",
    "SearchHit",
    "VectorIndex",
    "add_products",
    "build_index",
    "build_index_from_vectors",
    "check_embedder",
    "check_index_target",
    "choose_kind",
    "default_params",
    "exact_topk",
    "index_lock",
    "index_store_dir",
    "load_index_embedder",
    "make_query",
    "measure_recall",
    "read_manifest",
    "recall_at_k",
    "search",
]
