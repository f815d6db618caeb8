"""The ``random`` baseline: the chance floor.

Every record gets a unit vector drawn from a generator seeded by (seed, kind, id), so repeated
encodings agree and the ranking of candidates is independent of the content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from moon.data.records import Product, Query


class RandomEmbedder:
    """Content-blind embeddings: ``(n, dim)`` float32 unit rows, deterministic per record id."""

    def __init__(self, dim: int = 256, seed: int = 0):
        self.dim = int(dim)
        self.seed = int(seed)
        self.name = f"random(seed={self.seed})"

    def fingerprint(self) -> str:
        return hashlib.sha256(f"random:{self.dim}:{self.seed}".encode()).hexdigest()[:16]

    def _vectors(self, kind: str, ids: Sequence[str]) -> np.ndarray:
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for i, rid in enumerate(ids):
            digest = hashlib.sha256(f"{self.seed}:{kind}:{rid}".encode()).digest()
            v = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out

    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        return self._vectors("product", [p.id for p in products])

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        return self._vectors("query", [q.id for q in queries])


def load_random(arg: str | None = None, **overrides) -> RandomEmbedder:
    """``random`` or ``random:SEED``."""
    from moon.errors import ConfigError

    seed = overrides.pop("seed", 0)
    if arg:
        try:
            seed = int(arg)
        except ValueError:
            raise ConfigError(f"random:{arg}: the argument of the random baseline is an integer seed") from None
    return RandomEmbedder(seed=seed, **overrides)
