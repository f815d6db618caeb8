"""Build an index from a product store with an embedder; add and remove products later."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moon.data import Product, ProductStore
from moon.embedders import Embedder
from moon.errors import ConfigError, DataError
from moon.index.kinds import EXACT_LIMIT, HNSW_LIMIT, choose_kind, default_params
from moon.index.manifest import MANIFEST_FILE, IndexManifest
from moon.index.recall import exact_topk, recall_at_k
from moon.index.vector_index import VectorIndex

RECALL_K = 10


def check_embedder(manifest: IndexManifest, embedder: Embedder, *, where: str = "index") -> None:
    """Refuse a model whose fingerprint or dimension differs from the one the index was built with."""
    if int(embedder.dim) != manifest.dim:
        raise ConfigError(f"{where}: built with {manifest.dim}-d vectors, the model gives {embedder.dim}-d")
    fingerprint = embedder.fingerprint()
    if fingerprint != manifest.fingerprint:
        raise ConfigError(
            f"{where}: built with model {manifest.model!r} (fingerprint {manifest.fingerprint[:12]}), "
            f"but the given model has fingerprint {fingerprint[:12]}; rebuild the index or pass the same model"
        )


def load_index_embedder(manifest: IndexManifest, model: str | None = None) -> Embedder:
    """Load the model an index was built with (or ``model``) and check that it matches."""
    from moon.embedders import load_embedder

    embedder = load_embedder(model or manifest.model)
    check_embedder(manifest, embedder, where=f"index of {manifest.store}")
    return embedder


def _batches(items: Iterable[Product], size: int) -> Iterator[list[Product]]:
    batch: list[Product] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_products(
    embedder: Embedder,
    products: Iterable[Product],
    *,
    batch_size: int = 64,
    total: int | None = None,
    show_progress: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield ``(ids, vectors)`` per batch; vectors float32 ``(b, dim)``."""
    bar = tqdm(total=total, desc="encoding products", unit="product", disable=not show_progress)
    try:
        for batch in _batches(products, batch_size):
            vectors = np.asarray(embedder.encode_products(batch, batch_size=batch_size), dtype=np.float32)
            if vectors.shape != (len(batch), embedder.dim):
                raise DataError(
                    f"embedder {embedder.name!r} returned shape {vectors.shape} for {len(batch)} products "
                    f"(expected ({len(batch)}, {embedder.dim}))"
                )
            bar.update(len(batch))
            yield [p.id for p in batch], vectors
    finally:
        bar.close()


def measure_recall(
    index: VectorIndex, vectors: np.ndarray, *, queries: int = 1000, seed: int = 0, k: int = RECALL_K
) -> float:
    """Recall@k of ``index`` vs exact search over ``vectors`` (row i has label i), on sampled rows as queries."""
    n = vectors.shape[0]
    if n == 0 or queries <= 0:
        return 1.0
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    q = np.asarray(vectors[rows], dtype=np.float32)
    truth = exact_topk(q, vectors, k)
    approx = index.search_labels(q, min(k, n))
    return recall_at_k(approx, truth, k)


def build_index_from_vectors(
    out_dir: str | os.PathLike,
    ids: Sequence[str],
    vectors: np.ndarray,
    *,
    model: str,
    fingerprint: str,
    store: str = "",
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    exact_limit: int = EXACT_LIMIT,
    hnsw_limit: int = HNSW_LIMIT,
    recall_queries: int = 1000,
    seed: int = 0,
    chunk: int = 65536,
    show_progress: bool = False,
) -> VectorIndex:
    """Index ``vectors`` (float32 ``(n, dim)``, may be a memmap) under ``ids`` and write ``out_dir``.

    For ``hnsw`` / ``ivfpq`` the Recall@10 against exact search is measured on ``recall_queries``
    sampled rows and stored in the manifest.
    """
    n, dim = vectors.shape
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors")
    kind = choose_kind(n, kind, exact_limit=exact_limit, hnsw_limit=hnsw_limit)
    merged = {**default_params(kind, dim, n), **(params or {})}
    index = VectorIndex.create(
        out_dir, model=model, fingerprint=fingerprint, dim=dim, kind=kind, store=store, params=merged
    )
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, int(merged.get("train_size", n))), replace=False))
        index.train(np.asarray(vectors[rows], dtype=np.float32))
    bar = tqdm(total=n, desc=f"indexing ({kind})", unit="vector", disable=not show_progress)
    for start in range(0, n, chunk):
        block = np.asarray(vectors[start : start + chunk], dtype=np.float32)
        index.add(ids[start : start + len(block)], block)
        bar.update(len(block))
    bar.close()
    if kind == "exact":
        index.manifest.recall_at_10, index.manifest.recall_queries = 1.0, 0
    else:
        index.manifest.recall_at_10 = round(measure_recall(index, vectors, queries=recall_queries, seed=seed), 4)
        index.manifest.recall_queries = min(recall_queries, n)
    index.manifest.recall_count = n
    index.save()
    return index


def build_index(
    embedder: Embedder,
    store: ProductStore | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | None = None,
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    batch_size: int = 64,
    exact_limit: int = EXACT_LIMIT,
    hnsw_limit: int = HNSW_LIMIT,
    recall_queries: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = False,
) -> VectorIndex:
    """Encode every product of ``store`` with ``embedder`` and write a FAISS index to ``out_dir``.

    Vectors are spooled to a temporary ``.npy`` memmap in ``out_dir`` (n × dim × 4 bytes on disk,
    deleted afterwards), so RAM holds one batch plus the FAISS index. ``model`` is the spec string
    recorded for ``load_embedder`` (defaults to ``embedder.name``).
    """
    store = store if isinstance(store, ProductStore) else ProductStore(store)
    out = Path(out_dir)
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise ConfigError(f"{out}: an index already exists here (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    ids_in_store = store.product_ids()
    n = len(ids_in_store)
    if n == 0:
        raise DataError(f"{store.root}: the store has no products to index")
    spool = out / "vectors.spool.npy"
    vectors = np.lib.format.open_memmap(spool, mode="w+", dtype=np.float32, shape=(n, int(embedder.dim)))
    try:
        ids: list[str] = []
        for batch_ids, batch_vectors in encode_products(
            embedder, store.iter_products(), batch_size=batch_size, total=n, show_progress=show_progress
        ):
            vectors[len(ids) : len(ids) + len(batch_ids)] = batch_vectors
            ids.extend(batch_ids)
        if len(ids) != n:
            raise DataError(f"{store.root}: products.parquet yielded {len(ids)} products, its id column {n}")
        vectors.flush()
        return build_index_from_vectors(
            out,
            ids,
            vectors,
            model=model or embedder.name,
            fingerprint=embedder.fingerprint(),
            store=str(store.root),
            kind=kind,
            params=params,
            exact_limit=exact_limit,
            hnsw_limit=hnsw_limit,
            recall_queries=recall_queries,
            seed=seed,
            show_progress=show_progress,
        )
    finally:
        del vectors
        if spool.exists():
            spool.unlink()


def add_products(
    index: VectorIndex,
    embedder: Embedder,
    products: Iterable[Product],
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> tuple[int, int]:
    """Encode and add (or replace) products in an opened index; returns ``(added, replaced)``.

    Call ``index.save()`` afterwards. The stored Recall@10 stays the one measured at build time
    (``recall_count`` says on how many vectors).
    """
    check_embedder(index.manifest, embedder, where=str(index.root))
    added = replaced = 0
    for ids, vectors in encode_products(embedder, products, batch_size=batch_size, show_progress=show_progress):
        a, r = index.add(ids, vectors)
        added += a
        replaced += r
    return added, replaced
