"""An index directory opened in memory: FAISS index + label → product id table + manifest."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moon.errors import ConfigError, DataError
from moon.index.kinds import apply_search_params, new_faiss_index
from moon.index.manifest import (
    FAISS_FILE,
    IDS_FILE,
    RERANK_FILE,
    IndexFormatError,
    IndexManifest,
    read_manifest,
    utc_now,
    write_manifest,
)

IDS_SCHEMA = pa.schema([("label", pa.int64()), ("id", pa.string())])


@dataclass(frozen=True)
class Neighbour:
    """One search result: product id and inner-product score (cosine for unit vectors)."""

    id: str
    score: float


class VectorIndex:
    """Product vectors searchable by inner product, with incremental add (upsert) and remove.

    Open one with :meth:`open` (an existing directory) or :meth:`create` (a new, empty one);
    changes stay in memory until :meth:`save` — except the re-rank vectors of ``ivfpq``, which
    are written to ``rerank.f32`` as they are added (by label; rows past the saved
    ``next_label`` are ignored when the directory is opened again).

    ``ivfpq`` with ``params["rerank"] = R > 0`` answers a top-k search by asking the compressed
    index for ``R·k`` candidates and ranking those by their exact inner products with the full
    vectors (memory-mapped from ``rerank.f32``: 4·dim bytes per vector on disk, only the rows
    touched in memory), so its scores are exact and its recall is that of the candidate list.
    """

    def __init__(self, root: str | os.PathLike, manifest: IndexManifest, index: faiss.Index, ids: dict[int, str]):
        self.root = Path(root)
        self.manifest = manifest
        self.faiss = index
        self._id_of: dict[int, str] = dict(ids)
        self._label_of: dict[str, int] = {pid: label for label, pid in self._id_of.items()}
        self._rerank_map: np.ndarray | None = None

    @property
    def rerank(self) -> int:
        """Candidates per result for the exact re-rank (0: none; only ``ivfpq`` has one)."""
        return int(self.manifest.params.get("rerank", 0)) if self.manifest.kind == "ivfpq" else 0

    # ------------------------------------------------------------------ open / create / save
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        *,
        model: str,
        fingerprint: str,
        dim: int,
        kind: str,
        store: str,
        params: dict[str, Any],
    ) -> VectorIndex:
        """A new empty index (not written until :meth:`save`)."""
        manifest = IndexManifest(
            model=model, fingerprint=fingerprint, dim=int(dim), kind=kind, store=store, params=params
        )
        stale = Path(root) / RERANK_FILE
        if stale.exists():  # a new index replaces the old one's re-rank rows too
            stale.unlink()
        return cls(root, manifest, new_faiss_index(kind, int(dim), params), {})

    @classmethod
    def open(cls, root: str | os.PathLike) -> VectorIndex:
        """Load ``manifest.json``, ``vectors.faiss`` and ``ids.parquet`` (no pickle anywhere)."""
        root = Path(root)
        manifest = read_manifest(root)
        faiss_path, ids_path = root / FAISS_FILE, root / IDS_FILE
        for path in (faiss_path, ids_path):
            if not path.is_file():
                raise IndexFormatError(f"{path}: missing (the index directory is incomplete; rebuild it)")
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError as exc:
            raise IndexFormatError(f"{faiss_path}: unreadable FAISS index ({str(exc).splitlines()[-1]})") from exc
        try:
            table = pq.read_table(ids_path)
        except Exception as exc:  # noqa: BLE001 - arrow raises several types for broken files
            raise IndexFormatError(f"{ids_path}: unreadable ({exc})") from exc
        labels = table.column("label").to_pylist()
        ids = table.column("id").to_pylist()
        if index.ntotal != len(ids) or index.d != manifest.dim:
            raise IndexFormatError(
                f"{root}: inconsistent index ({index.ntotal} vectors of dim {index.d}, {len(ids)} ids, "
                f"manifest dim {manifest.dim}); rebuild it"
            )
        apply_search_params(index, manifest.kind, manifest.params)
        opened = cls(root, manifest, index, dict(zip(labels, ids, strict=True)))
        if opened.rerank:
            path = root / RERANK_FILE
            need = manifest.next_label * manifest.dim * 4
            if not path.is_file() or path.stat().st_size < need:
                have = f"{path.stat().st_size:,} bytes" if path.is_file() else "missing"
                raise IndexFormatError(f"{path}: {have}, the index needs {need:,} (rebuild it)")
        return opened

    def save(self) -> None:
        """Write the FAISS index, the id table and (last) the manifest, each atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (FAISS_FILE + ".tmp")
        faiss.write_index(self.faiss, str(tmp))
        os.replace(tmp, self.root / FAISS_FILE)
        labels = sorted(self._id_of)
        table = pa.Table.from_pydict({"label": labels, "id": [self._id_of[x] for x in labels]}, schema=IDS_SCHEMA)
        tmp = self.root / (IDS_FILE + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.root / IDS_FILE)
        self.manifest.count = len(self)
        self.manifest.updated = utc_now()
        write_manifest(self.root, self.manifest)

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._label_of

    def ids(self) -> list[str]:
        """Indexed product ids in label (insertion) order."""
        return [self._id_of[label] for label in sorted(self._id_of)]

    @property
    def is_trained(self) -> bool:
        return bool(self.faiss.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train an ``ivfpq`` index on a sample ``(n, dim)``; a no-op for the other kinds."""
        if not self.faiss.is_trained:
            self.faiss.train(self._check(vectors, "training vectors"))

    def _check(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
            raise DataError(f"{what}: expected shape (n, {self.manifest.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise DataError(f"{what}: contains NaN or infinite values")
        return vectors

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[int, int]:
        """Add products (``vectors`` float32 ``(n, dim)``); an id already present is replaced.

        Returns ``(added, replaced)``.
        """
        ids = [str(x) for x in ids]
        vectors = self._check(vectors, "vectors")
        if len(ids) != vectors.shape[0]:
            raise ValueError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
        if len(set(ids)) != len(ids):
            dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
            raise DataError(f"duplicate product ids in one add: {', '.join(dup)}")
        if not self.faiss.is_trained:
            raise ConfigError(f"{self.root}: the {self.manifest.kind} index must be trained before adding vectors")
        replaced = [x for x in ids if x in self._label_of]
        if replaced:
            self.remove(replaced)
        start = self.manifest.next_label
        labels = np.arange(start, start + len(ids), dtype=np.int64)
        if len(ids):
            self.faiss.add_with_ids(vectors, labels)
            if self.rerank:
                self._write_rerank(start, vectors)
        for label, pid in zip(labels.tolist(), ids, strict=True):
            self._id_of[label] = pid
            self._label_of[pid] = label
        self.manifest.next_label = start + len(ids)
        self.manifest.count = len(self)
        return len(ids) - len(replaced), len(replaced)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove products by id (unknown ids are ignored); returns how many were removed.

        ``exact`` and ``ivfpq`` delete in place; ``hnsw`` graphs cannot delete, so the graph is
        rebuilt from the remaining (exactly stored) vectors.
        """
        labels = [self._label_of[str(x)] for x in dict.fromkeys(ids) if str(x) in self._label_of]
        if not labels:
            return 0
        if self.manifest.kind == "hnsw":
            drop = set(labels)
            keep = np.array([label for label in sorted(self._id_of) if label not in drop], dtype=np.int64)
            vectors = np.stack([self.faiss.reconstruct(int(x)) for x in keep]) if len(keep) else None
            fresh = new_faiss_index("hnsw", self.manifest.dim, self.manifest.params)
            if vectors is not None:
                fresh.add_with_ids(vectors, keep)
            self.faiss = fresh
        else:
            removed = self.faiss.remove_ids(np.array(labels, dtype=np.int64))
            if removed != len(labels):
                raise RuntimeError(f"FAISS removed {removed} of {len(labels)} vectors")
        for label in labels:
            del self._label_of[self._id_of.pop(label)]
        self.manifest.count = len(self)
        return len(labels)

    # ------------------------------------------------------------------ exact re-rank (ivfpq)
    def _write_rerank(self, start: int, vectors: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / RERANK_FILE
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(start * self.manifest.dim * 4)
            f.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self._rerank_map = None

    def _rerank_vectors(self) -> np.ndarray:
        if self._rerank_map is None:
            path = self.root / RERANK_FILE
            rows = path.stat().st_size // (self.manifest.dim * 4) if path.is_file() else 0
            if rows < self.manifest.next_label:
                raise IndexFormatError(f"{path}: holds {rows:,} vectors, the index {self.manifest.next_label:,}")
            self._rerank_map = np.memmap(path, dtype="<f4", mode="r", shape=(rows, self.manifest.dim))
        return self._rerank_map

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search, then (``ivfpq`` with ``rerank``) the exact re-rank of ``rerank·k`` candidates."""
        if not self.rerank:
            return self.faiss.search(queries, k)
        candidates = min(len(self), k * self.rerank)
        _, labels = self.faiss.search(queries, candidates)
        full = self._rerank_vectors()
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_labels = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (q, cand) in enumerate(zip(queries, labels, strict=True)):
            cand = cand[cand >= 0]
            exact = np.asarray(full[cand]) @ q
            order = np.lexsort((cand, -exact))[:k]  # best first; equal scores by label
            out_scores[row, : len(order)] = exact[order]
            out_labels[row, : len(order)] = cand[order]
        return out_scores, out_labels

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Neighbour]]:
        """The ``k`` best products of each query (``(q, dim)`` float32), best first."""
        queries = self._check(np.atleast_2d(queries), "queries")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if len(self) == 0:
            return [[] for _ in range(queries.shape[0])]
        scores, labels = self._search(queries, min(k, len(self)))
        return [
            [
                Neighbour(self._id_of[int(label)], float(score))
                for score, label in zip(srow, lrow, strict=True)
                if label >= 0
            ]
            for srow, lrow in zip(scores, labels, strict=True)
        ]

    def search_labels(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Raw FAISS labels ``(q, k)`` (-1 where fewer hits); for recall measurements."""
        return self._search(self._check(queries, "queries"), k)[1]
