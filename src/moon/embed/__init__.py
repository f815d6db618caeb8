"""Catalogue-scale embedding: every product of a store into resumable Parquet vector shards.

``embed_store(store, out_dir, embedder)`` writes ``shard-NNNNN.parquet`` files and a manifest
(:mod:`moon.embed.shards`); a rerun skips the shards already finished. ``moon index build
--from-vectors`` indexes them without encoding again (:mod:`moon.index.from_vectors`). Engines:
``local`` (this process) and ``ray`` (a Ray Data actor pool, :mod:`moon.embed.ray_engine`).
"""

from moon.embed.run import DEFAULT_SHARD_SIZE, ENGINES, EmbedSummary, embed_store
from moon.embed.shards import (
    VectorFormatError,
    VectorShards,
    VectorsManifest,
    read_manifest,
    read_shard,
    shard_name,
)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ENGINES",
    "EmbedSummary",
    "VectorFormatError",
    "VectorShards",
    "VectorsManifest",
    "embed_store",
    "read_manifest",
    "read_shard",
    "shard_name",
]
