"""An on-disk cache of embeddings, keyed by model fingerprint + data hash + encoding variant.

Files are plain ``.npy`` (loaded with ``allow_pickle=False``) next to a small JSON sidecar that
records what they hold; a file whose shape disagrees with the request is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moon.data.records import as_dict

DEFAULT_CACHE_DIR = Path(os.environ.get("MOON_CACHE", Path.home() / ".cache" / "moon")) / "embeddings"


def records_hash(records: Sequence[Any], *, salt: str = "") -> str:
    """A sha256 over the records' content (ids, texts, image paths, categories …) in order."""
    h = hashlib.sha256(salt.encode("utf-8"))
    for rec in records:
        h.update(json.dumps(as_dict(rec), sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


class EmbeddingCache:
    """``get_or_compute(fingerprint, data_hash, variant, n, compute)`` → ``(n, dim)`` float32.

    ``directory=None`` disables caching (every call computes). ``hits`` / ``misses`` count lookups.
    """

    def __init__(self, directory: str | os.PathLike | None = DEFAULT_CACHE_DIR):
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, data_hash: str, variant: str) -> str:
        return hashlib.sha256(f"{fingerprint}\0{data_hash}\0{variant}".encode()).hexdigest()[:40]

    def path(self, fingerprint: str, data_hash: str, variant: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{self.key(fingerprint, data_hash, variant)}.npy"

    def get_or_compute(
        self,
        fingerprint: str,
        data_hash: str,
        variant: str,
        n: int,
        compute: Callable[[], np.ndarray],
        *,
        meta: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """The cached array when it exists with ``n`` rows; otherwise ``compute()`` it and store it."""
        path = self.path(fingerprint, data_hash, variant)
        if path is not None and path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                arr = None
            if arr is not None and arr.ndim == 2 and len(arr) == n and arr.dtype == np.float32:
                self.hits += 1
                return arr
        self.misses += 1
        arr = np.ascontiguousarray(compute(), dtype=np.float32)
        if arr.ndim != 2 or len(arr) != n:
            raise ValueError(f"embedder returned shape {arr.shape} for {n} records")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, arr, allow_pickle=False)
            os.replace(tmp, path)
            info = {"fingerprint": fingerprint, "data_hash": data_hash, "variant": variant, "shape": list(arr.shape)}
            info.update(meta or {})
            path.with_suffix(".json").write_text(
                json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        return arr
