"""Build an index from the vector shards of ``moon embed``, without encoding a product again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moon import progress
from moon.data import ProductStore
from moon.errors import ConfigError, DataError
from moon.index.atomic import check_index_target, index_lock, new_staging
from moon.index.build import index_store_vectors
from moon.index.kinds import EXACT_LIMIT, HNSW_LIMIT
from moon.index.manifest import MANIFEST_FILE
from moon.index.references import manifest_store_dir
from moon.index.vector_index import VectorIndex
from moon.models import Embedder


def check_vectors_embedder(vectors_dir: str | os.PathLike, embedder: Embedder, *, model: str | None = None) -> None:
    """Refuse an embedder whose fingerprint or dimension differs from the one that wrote the shards."""
    from moon.embed.shards import read_manifest

    vm = read_manifest(vectors_dir)
    fingerprint = embedder.fingerprint()
    if (fingerprint, int(embedder.dim)) != (vm.fingerprint, vm.dim):
        raise ConfigError(
            f"{vectors_dir}: embedded by model {vm.model!r} (fingerprint {vm.fingerprint[:12]}, dim {vm.dim}), "
            f"but {model or embedder.name!r} has fingerprint {fingerprint[:12]} (dim {embedder.dim}); "
            "pass the model that wrote the vectors"
        )


def build_index_from_shards(
    vectors_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    embedder: Embedder,
    *,
    model: str | None = None,
    store: ProductStore | str | os.PathLike | None = None,
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    exact_limit: int = EXACT_LIMIT,
    hnsw_limit: int = HNSW_LIMIT,
    recall_queries: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = False,
) -> VectorIndex:
    """Index the finished vectors directory ``vectors_dir`` (written by :func:`moon.embed.embed_store`)
    with :func:`moon.index.build_index_from_vectors`, the builder ``build_index`` uses.

    ``embedder`` (the model the user named, spec ``model``) must have the vectors' fingerprint and
    dimension (:class:`ConfigError` otherwise); it encodes the store's queries for the Recall@10
    check, as :func:`moon.index.build_index` does, and the index records it as its model. Every
    shard is checked (sha256, schema, ids; :class:`moon.embed.VectorFormatError` otherwise) and
    spooled to a temporary ``.npy`` memmap in a staging folder of ``out_dir``, so RAM holds one
    shard plus the FAISS index. ``store`` defaults to the one the vectors name; it must hold the
    same products in the same order.
    """
    from moon.embed.shards import VectorShards

    source = Path(vectors_dir)
    shards = VectorShards.open(source)
    vm = shards.manifest
    check_vectors_embedder(source, embedder, model=model)
    model = model or embedder.name
    out = Path(out_dir)
    check_index_target(out)
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise ConfigError(f"{out}: an index already exists here (pass --overwrite to replace it)")
    store = store if store is not None else manifest_store_dir(vm, source)
    store = store if isinstance(store, ProductStore) else ProductStore(store)
    store_ids = store.product_ids()
    if len(store_ids) != vm.products:
        raise DataError(
            f"{source}: holds {vm.products:,} products, the store {store.root} has {len(store_ids):,} now; embed it again"
        )
    n = vm.products
    out.mkdir(parents=True, exist_ok=True)
    with index_lock(out):
        if (out / MANIFEST_FILE).exists() and not overwrite:  # another build finished while we waited
            raise ConfigError(f"{out}: an index already exists here (pass --overwrite to replace it)")
        spool_dir = new_staging(out)
        try:
            vectors = np.lib.format.open_memmap(
                spool_dir / "vectors.spool.npy", mode="w+", dtype=np.float32, shape=(n, vm.dim)
            )
            ids: list[str] = []
            with progress.bar(n, "read vectors", enabled=show_progress, unit="vector") as bar:
                for shard_ids, shard_vectors in shards:
                    if shard_ids != store_ids[len(ids) : len(ids) + len(shard_ids)]:
                        raise DataError(
                            f"{source}: rows {len(ids):,}.. hold other products than the store {store.root} now; "
                            "embed it again"
                        )
                    vectors[len(ids) : len(ids) + len(shard_ids)] = shard_vectors
                    ids.extend(shard_ids)
                    bar.update(len(shard_ids))
            vectors.flush()
            return index_store_vectors(
                out, ids, vectors, embedder, store, model=model, fingerprint=vm.fingerprint, kind=kind,
                params=params, exact_limit=exact_limit, hnsw_limit=hnsw_limit, recall_queries=recall_queries,
                seed=seed, show_progress=show_progress,
            )  # fmt: skip
        finally:
            vectors = None
            shutil.rmtree(spool_dir, ignore_errors=True)
