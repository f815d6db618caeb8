"""Build an index from a product store with an embedder; add and remove products later."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moon import progress
from moon.data import Product, ProductStore
from moon.errors import ConfigError, DataError, MoonError
from moon.index.atomic import check_index_target, index_lock, new_staging
from moon.index.kinds import EXACT_LIMIT, HNSW_LIMIT, apply_search_params, choose_kind, default_params
from moon.index.manifest import MANIFEST_FILE, IndexManifest
from moon.index.recall import exact_topk, recall_at_k
from moon.index.references import (
    manifest_model_spec,
    manifest_store_dir,
    model_reference,
    store_reference,
)
from moon.index.vector_index import VectorIndex
from moon.models import Embedder, load_embedder

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


def load_index_embedder(
    manifest: IndexManifest,
    model: str | None = None,
    *,
    index_dir: str | os.PathLike,
    trust_remote_code: bool = False,
) -> Embedder:
    """Load the model of the index in ``index_dir`` and check that its fingerprint matches.

    ``model`` is the user's own ``--model`` (any spec; ``trust_remote_code`` only for ``gme``);
    without it the manifest's reference is used, which only ever names presets and saved model
    directories (:func:`moon.index.references.manifest_model_spec`), never code.
    """
    spec = model if model is not None else manifest_model_spec(manifest, index_dir)
    # the user's own --model may carry their --trust-remote-code; a manifest's spec never does
    embedder = load_embedder(spec, trust_remote_code=trust_remote_code and model is not None)
    check_embedder(manifest, embedder, where=f"index {index_dir}")
    return embedder


def index_store_dir(manifest: IndexManifest, index_dir: str | os.PathLike) -> Path:
    """The product store an index was built from (absolute, else relative to the index)."""
    return manifest_store_dir(manifest, index_dir)


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
    bar = progress.bar(total, "encode products", enabled=show_progress, unit="product")
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
    index: VectorIndex,
    vectors: np.ndarray,
    rows: np.ndarray,
    queries: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    k: int = RECALL_K,
) -> float:
    """Recall@k of ``index`` vs exact search, for ``queries`` ``(q, dim)``.

    The index holds ``vectors[rows]`` (``vectors`` may be a memmap) with labels ``0 … len(rows)-1``
    in that order; ``exclude`` are the other rows of ``vectors`` (not in the index). The queries
    must not be in the index: a query that is finds itself and flatters approximate search.
    """
    n = len(rows)
    if n == 0 or len(queries) == 0:
        return 1.0
    q = np.asarray(queries, dtype=np.float32)
    truth_rows = exact_topk(q, vectors, k, exclude=exclude)
    truth = np.searchsorted(np.asarray(rows, dtype=np.int64), truth_rows)  # row → label
    approx = index.search_labels(q, min(k, n))
    return recall_at_k(approx, truth, k)


def _held_out_rows(n: int, queries: int, seed: int) -> np.ndarray:
    """Rows left out of the index while its recall is measured: at most ``queries`` and at most a
    tenth of the rows (a much smaller index would be easier to search than the real one)."""
    size = min(queries, n // 10)
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(vectors[rows], dtype=np.float32)


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
    queries: np.ndarray | None = None,
    queries_source: str = "given queries",
    references: dict[str, Any] | None = None,
    seed: int = 0,
    chunk: int = 65536,
    show_progress: bool = False,
) -> VectorIndex:
    """Index ``vectors`` (float32 ``(n, dim)``, may be a memmap) under ``ids`` and write ``out_dir``.

    For ``hnsw`` / ``ivfpq`` the Recall@10 against exact search is measured on queries that are
    not in the index and stored in the manifest with ``recall_source``: the rows of ``queries``
    (``(q, dim)``, e.g. the store's own queries encoded by the model) when given, else up to
    ``recall_queries`` sampled product vectors held out of the index while measuring and added
    afterwards (at most a tenth of them).

    The search-time knobs the caller did not set in ``params`` (``ef_search``; ``nprobe`` and
    ``rerank``) are tuned on half of those queries — doubled from their defaults until Recall@10
    reaches :data:`TUNE_TARGET` or their caps (:data:`TUNED`) — and the recall is reported on the
    other half. An ``ivfpq`` index chosen by ``kind="auto"`` whose reported recall is below
    :data:`AUTO_IVFPQ_MIN` is not used: the vectors are indexed with ``hnsw`` instead (with a
    warning). (The margin over 0.9 covers the sampling error of a few hundred queries, so that
    fresh queries reach 0.9.)

    ``model`` and ``store`` are recorded as given, then overwritten by ``references`` (manifest
    fields, see :mod:`moon.index.references`) if given.

    An index already in ``out_dir`` is replaced as a whole when the new one is saved, and stays as
    it was if the build fails or is killed (:mod:`moon.index.atomic`); the index's lock is held
    throughout. A folder whose ``manifest.json`` is not an index's is refused before anything is
    written.
    """
    n, dim = vectors.shape
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors")
    chosen = choose_kind(n, kind, exact_limit=exact_limit, hnsw_limit=hnsw_limit)
    given = dict(params or {})
    merged = {**default_params(chosen, dim, n), **given}
    check_index_target(out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with index_lock(out_dir):
        index = VectorIndex.create(
            out_dir, model=model, fingerprint=fingerprint, dim=dim, kind=chosen, store=store, params=merged
        )
        try:
            return _fill(
                index, out_dir, ids, vectors, kind=kind, chosen=chosen, given=given, model=model,
                fingerprint=fingerprint, store=store, recall_queries=recall_queries, queries=queries,
                queries_source=queries_source, references=references, seed=seed, chunk=chunk,
                show_progress=show_progress,
            )  # fmt: skip
        finally:
            index.discard()  # unsaved re-rank rows of a failed build, or of an IVF-PQ attempt replaced by HNSW


def _fill(
    index: VectorIndex,
    out_dir: str | os.PathLike,
    ids: Sequence[str],
    vectors: np.ndarray,
    *,
    kind: str,
    chosen: str,
    given: dict[str, Any],
    model: str,
    fingerprint: str,
    store: str,
    recall_queries: int,
    queries: np.ndarray | None,
    queries_source: str,
    references: dict[str, Any] | None,
    seed: int,
    chunk: int,
    show_progress: bool,
) -> VectorIndex:
    """Train, add, measure and save ``index`` (the body of :func:`build_index_from_vectors`)."""
    n, dim = vectors.shape
    merged = index.manifest.params
    measured = chosen != "exact" and (queries is not None or recall_queries > 0)
    held = _held_out_rows(n, recall_queries, seed) if measured and queries is None else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), held) if len(held) else np.arange(n, dtype=np.int64)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(keep, size=min(len(keep), int(merged.get("train_size", n))), replace=False))
        index.train(_rows(vectors, rows))
    bar = progress.bar(n, f"index ({chosen})", enabled=show_progress, unit="vector")
    for start in range(0, len(keep), chunk):
        rows = keep[start : start + chunk]
        block = _rows(vectors, rows) if len(held) else _rows(vectors, slice(start, start + len(rows)))
        index.add([ids[int(i)] for i in rows], block)
        bar.update(len(rows))
    m = index.manifest
    probe = np.asarray(queries, dtype=np.float32) if queries is not None else _rows(vectors, held)
    if chosen == "exact":
        m.recall_at_10, m.recall_queries, m.recall_source = 1.0, 0, "exact"
    elif measured and len(probe):
        # the adds above gave the kept rows labels 0, 1, … in order; exact search skips the held-out rows
        tune, report = (probe[0::2], probe[1::2]) if len(probe) >= 2 else (probe, probe)
        _tune(index, vectors, keep, tune, held, skip=set(given))
        m.recall_at_10 = round(measure_recall(index, vectors, keep, report, exclude=held), 4)
        if m.recall_at_10 < AUTO_IVFPQ_MIN and kind == "auto" and chosen == "ivfpq":
            bar.close()
            warnings.warn(
                f"IVF-PQ reaches Recall@10 {m.recall_at_10:.3f} < {AUTO_IVFPQ_MIN} on held-out queries at "
                f"nprobe={m.params['nprobe']}, rerank={m.params['rerank']}; indexing the {n:,} vectors with HNSW "
                "instead",
                stacklevel=2,
            )
            index.discard()
            return build_index_from_vectors(
                out_dir, ids, vectors, model=model, fingerprint=fingerprint, store=store, kind="hnsw",
                params={k: v for k, v in given.items() if k in default_params("hnsw", dim, n)},
                recall_queries=recall_queries, queries=queries, queries_source=queries_source,
                references=references, seed=seed, chunk=chunk, show_progress=show_progress,
            )  # fmt: skip
        m.recall_queries = len(report)
        m.recall_source = queries_source if queries is not None else "held-out vectors"
    else:
        m.recall_at_10, m.recall_queries, m.recall_source = None, 0, None
    m.recall_count = len(keep)
    if len(held):  # the held-out products join the index now that it has been measured
        index.add([ids[int(i)] for i in held], _rows(vectors, held))
        bar.update(len(held))
    bar.close()
    for key, value in (references or {}).items():
        setattr(m, key, value)
    index.save()
    return index


#: the Recall@10 on held-out queries that build-time tuning aims for
TUNE_TARGET = 0.95
#: the least Recall@10 on held-out queries for which ``kind="auto"`` keeps an ``ivfpq`` index
AUTO_IVFPQ_MIN = 0.93
#: search-time knobs tuned at build time, with their caps (each doubles per round)
TUNED: dict[str, tuple[tuple[str, int], ...]] = {
    "hnsw": (("ef_search", 1024),),
    "ivfpq": (("nprobe", 1024), ("rerank", 64)),
}


def _tune(
    index: VectorIndex, vectors: np.ndarray, keep: np.ndarray, queries: np.ndarray, held: np.ndarray, skip: set[str]
) -> bool:
    """Double the knobs of :data:`TUNED` (except those in ``skip``) until Recall@10 on ``queries``
    reaches :data:`TUNE_TARGET`; ``False`` when the caps are reached first."""
    params = index.manifest.params
    knobs = [(name, cap) for name, cap in TUNED.get(index.manifest.kind, ()) if name not in skip]
    while True:
        if measure_recall(index, vectors, keep, queries, exclude=held) >= TUNE_TARGET:
            return True
        grew = False
        for name, cap in knobs:
            limit = min(cap, int(params["nlist"])) if name == "nprobe" else cap
            if int(params[name]) < limit:
                params[name] = min(limit, max(1, 2 * int(params[name])))
                grew = True
        if not grew:
            return False
        apply_search_params(index.faiss, index.manifest.kind, params)


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

    Vectors are spooled to a temporary ``.npy`` memmap in a staging folder inside ``out_dir``
    (n × dim × 4 bytes on disk, deleted afterwards), so RAM holds one batch plus the FAISS index. ``model`` is the spec the
    user gave (defaults to ``embedder.name``); a directory is recorded absolute and relative to
    ``out_dir`` (:func:`moon.index.references.model_reference`), as is the store.

    For ``hnsw`` / ``ivfpq``, Recall@10 vs exact search is measured on up to ``recall_queries`` of
    the store's own queries, encoded by ``embedder`` (``recall_source: "queries"``); a store
    without queries gets held-out product vectors instead.

    With ``overwrite`` an existing index is replaced only when the new one is complete: until
    then readers use the old one, and a failed or killed build leaves it as it was. A folder
    whose ``manifest.json`` is not an index's (a product store's, say) is refused before anything
    is written, even with ``overwrite``. The index's lock is held for the whole build.
    """
    out = Path(out_dir)
    check_index_target(out)
    store = store if isinstance(store, ProductStore) else ProductStore(store)
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise ConfigError(f"{out}: an index already exists here (pass --overwrite to replace it)")
    ids_in_store = store.product_ids()
    n = len(ids_in_store)
    if n == 0:
        raise DataError(f"{store.root}: the store has no products to index")
    out.mkdir(parents=True, exist_ok=True)
    with index_lock(out):
        if (out / MANIFEST_FILE).exists() and not overwrite:  # another build finished while we waited
            raise ConfigError(f"{out}: an index already exists here (pass --overwrite to replace it)")
        spool_dir = new_staging(out)
        try:
            return _build_spooled(
                embedder, store, out, spool_dir / "vectors.spool.npy", n, model=model, kind=kind, params=params,
                batch_size=batch_size, exact_limit=exact_limit, hnsw_limit=hnsw_limit, recall_queries=recall_queries,
                seed=seed, show_progress=show_progress,
            )  # fmt: skip
        finally:
            shutil.rmtree(spool_dir, ignore_errors=True)


def _build_spooled(
    embedder: Embedder,
    store: ProductStore,
    out: Path,
    spool: Path,
    n: int,
    *,
    model: str | None,
    kind: str,
    params: dict[str, Any] | None,
    batch_size: int,
    exact_limit: int,
    hnsw_limit: int,
    recall_queries: int,
    seed: int,
    show_progress: bool,
) -> VectorIndex:
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
        return index_store_vectors(
            out, ids, vectors, embedder, store, model=model or embedder.name, fingerprint=embedder.fingerprint(),
            kind=kind, params=params, exact_limit=exact_limit, hnsw_limit=hnsw_limit,
            recall_queries=recall_queries, seed=seed, show_progress=show_progress,
        )  # fmt: skip
    finally:
        del vectors


def index_store_vectors(
    out: Path,
    ids: list[str],
    vectors: np.ndarray,
    embedder: Embedder,
    store: ProductStore,
    *,
    model: str,
    fingerprint: str,
    kind: str,
    params: dict[str, Any] | None,
    exact_limit: int,
    hnsw_limit: int,
    recall_queries: int,
    seed: int,
    show_progress: bool,
) -> VectorIndex:
    """The index of a store's product ``vectors`` (in ``ids`` order, from ``embedder``): the kind
    chosen for their number, recall probed with the store's own queries (encoded by ``embedder``) for
    the approximate kinds, the model and store recorded as references. Shared by :func:`build_index`
    (vectors just encoded) and :func:`moon.index.from_vectors.build_index_from_shards` (vectors from
    ``moon embed``)."""
    chosen = choose_kind(len(ids), kind, exact_limit=exact_limit, hnsw_limit=hnsw_limit)
    probe = store_queries(embedder, store, recall_queries, seed) if chosen != "exact" else None
    return build_index_from_vectors(
        out,
        ids,
        vectors,
        model=model,
        fingerprint=fingerprint,
        store=str(store.root),
        kind=chosen,
        params=params,
        exact_limit=exact_limit,
        hnsw_limit=hnsw_limit,
        recall_queries=recall_queries,
        queries=probe,
        queries_source="queries",
        references=model_reference(model, out) | store_reference(store.root, out),
        seed=seed,
        show_progress=show_progress,
    )


def store_queries(embedder: Embedder, store: ProductStore, limit: int, seed: int) -> np.ndarray | None:
    """Up to ``limit`` of the store's queries (sampled with ``seed``), encoded; ``None`` when it has none."""
    if limit <= 0:
        return None
    queries = store.queries()
    if not queries:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(len(queries), size=min(limit, len(queries)), replace=False))
    try:
        vectors = np.asarray(embedder.encode_queries([queries[int(i)] for i in rows]), dtype=np.float32)
    except MoonError as exc:  # e.g. a query photo missing: measure on held-out product vectors instead
        warnings.warn(
            f"{store.root}: cannot encode its queries for the recall check ({exc}); using held-out products",
            stacklevel=3,
        )
        return None
    if vectors.shape != (len(rows), embedder.dim) or not np.isfinite(vectors).all():
        return None
    return vectors


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
