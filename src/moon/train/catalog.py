"""The training view of a product store: products by index, category groups and duplicate clusters.

A *duplicate cluster* joins products that must never be each other's negatives: the same group
(duplicate listings), an identical title, or a shared image (same SHA-1 of the file bytes). The
relation is closed transitively (union-find), so two listings linked through a third are one cluster.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moon.data import Product, Query, image_sha1
from moon.data.images import ImageLoadError
from moon.data.safe_open import read_json
from moon.errors import DataError


def normalise_text(text: str | None) -> str:
    """Lower-cased, whitespace-collapsed text (the key of title and query-text comparisons)."""
    return " ".join((text or "").lower().split())


#: the most of an image-hash cache file read back (about 1.5 M images)
MAX_HASH_CACHE_BYTES = 256 << 20


class ImageHashCache:
    """SHA-1 of image files, kept in a JSON file keyed by path, size and mtime."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._cache: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            try:  # a memo: a damaged, huge or deeply nested file is dropped and rebuilt, never trusted
                cache = read_json(self.path, MAX_HASH_CACHE_BYTES)
            except DataError as exc:
                warnings.warn(f"{exc}; the image hashes are computed again", RuntimeWarning, stacklevel=2)
                cache = {}
            if not (
                isinstance(cache, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in cache.items())
            ):
                warnings.warn(
                    f"{self.path}: not a map of image keys to hashes; computed again", RuntimeWarning, stacklevel=2
                )
                cache = {}
            self._cache = cache
        self._dirty = False

    def sha1(self, ref: object) -> str | None:
        """The hash of a file path (``None`` when unreadable) or of an in-memory image."""
        if not isinstance(ref, (str, os.PathLike)):
            try:
                return image_sha1(ref)  # type: ignore[arg-type]
            except ImageLoadError:
                return None
        try:
            st = os.stat(ref)
        except OSError:
            return None
        key = f"{os.fspath(ref)}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self._cache:
            try:
                self._cache[key] = image_sha1(ref)
            except ImageLoadError:
                return None
            self._dirty = True
        return self._cache[key]

    def save(self) -> None:
        """Write the cache (through a temporary file). It is only a cache: a write that fails (a full
        disk, a read-only run directory) is a warning, the old file is left as it was, and training
        goes on (the hashes are computed again next time)."""
        if self.path is None or not self._dirty:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self._cache), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            warnings.warn(
                f"{self.path}: could not save the image-hash cache ({exc.strerror or exc}); training goes on, "
                "and the hashes are computed again next time",
                RuntimeWarning,
                stacklevel=2,
            )
        self._dirty = False


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_clusters(products: Sequence[Product], hashes: ImageHashCache | None = None) -> np.ndarray:
    """``(n,)`` int64 cluster id per product: same group, identical title or a shared image hash."""
    uf = _UnionFind(len(products))
    first: dict[tuple[str, str], int] = {}

    def link(kind: str, key: str | None, i: int) -> None:
        if not key:
            return
        j = first.setdefault((kind, key), i)
        if j != i:
            uf.union(i, j)

    for i, p in enumerate(products):
        link("id", str(p.id), i)
        link("group", p.group, i)
        link("title", normalise_text(p.title), i)
        if hashes is not None:
            for img in p.images:
                link("image", hashes.sha1(img), i)
    return np.array([uf.find(i) for i in range(len(products))], dtype=np.int64)


class ProductCatalog:
    """Products by integer index, with what the negative samplers and the guard need.

    Args:
        products: every product of the store.
        train_positives: query id → purchased product ids (the train split).
        queries: the train queries (for the "same query text" guard).
        hashes: image-hash cache; ``None`` skips the image part of the duplicate clusters.
    """

    def __init__(
        self,
        products: Sequence[Product],
        train_positives: dict[str, set[str]],
        queries: Sequence[Query],
        hashes: ImageHashCache | None = None,
    ):
        self.products = list(products)
        self.index = {str(p.id): i for i, p in enumerate(self.products)}
        self.cluster = duplicate_clusters(self.products, hashes)
        # category prefix (tuple) → product indices, for every level of every path
        self.by_prefix: dict[tuple[str, ...], list[int]] = {}
        for i, p in enumerate(self.products):
            for level in range(1, len(p.category) + 1):
                self.by_prefix.setdefault(tuple(p.category[:level]), []).append(i)
        # query text → indices of products bought after any train query with that text
        self.bought_after_text: dict[str, set[int]] = {}
        for q in queries:
            key = normalise_text(q.text)
            if not key:
                continue
            for pid in train_positives.get(q.id, ()):
                if pid in self.index:
                    self.bought_after_text.setdefault(key, set()).add(self.index[pid])
        self._hard_cache: dict[tuple[int, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self.products)

    def hard_pool(self, product_index: int, k: int) -> list[int]:
        """Candidates for hard negatives: the deepest category level of the product holding at
        least ``k`` products outside its duplicate cluster (all products when no level does)."""
        cached = self._hard_cache.get((product_index, k))
        if cached is not None:
            return cached
        pool = self._hard_pool(product_index, k)
        self._hard_cache[(product_index, k)] = pool
        return pool

    def _hard_pool(self, product_index: int, k: int) -> list[int]:
        p = self.products[product_index]
        own = self.cluster[product_index]
        for level in range(len(p.category), 0, -1):
            pool = [j for j in self.by_prefix[tuple(p.category[:level])] if self.cluster[j] != own]
            if len(pool) >= k:
                return pool
        return [j for j in range(len(self.products)) if self.cluster[j] != own]
