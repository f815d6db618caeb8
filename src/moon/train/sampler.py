"""Training batches: (query, purchased product, hard negatives), following the query modality mix.

The batch of step ``s`` is a pure function of ``(seed, s)``: each modality keeps its own stream of
seeded epoch permutations, and step ``s`` takes the next ``count[m]`` queries of each stream. So the
data position of a run is just its step, and ``--resume`` sees exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moon.data import Query
from moon.errors import ConfigError, DataError
from moon.train.catalog import ProductCatalog

_MODALITY_TAG = {"image": 1, "text": 2, "multimodal": 3}


@dataclass
class Example:
    """One training pair: a query, the index of its purchased product and its hard negatives."""

    query: Query
    positive: int
    hard: list[int] = field(default_factory=list)


def modality_counts(batch_size: int, mix: dict[str, float], available: Sequence[str]) -> dict[str, int]:
    """Split ``batch_size`` over the available modalities by the mix (largest remainder).

    >>> modality_counts(17, {"image": 12, "text": 3, "multimodal": 2}, ["image", "text", "multimodal"])
    {'image': 12, 'text': 3, 'multimodal': 2}
    """
    weights = {m: float(mix.get(m, 0.0)) for m in available if mix.get(m, 0.0) > 0}
    if not weights:
        raise ConfigError(
            f"data.modality_mix {dict(mix)} gives no weight to the modalities the train split has ({', '.join(available)})"
        )
    total = sum(weights.values())
    exact = {m: batch_size * w / total for m, w in weights.items()}
    counts = {m: int(np.floor(v)) for m, v in exact.items()}
    order = sorted(weights, key=lambda m: (-(exact[m] - counts[m]), list(weights).index(m)))
    for m in order[: batch_size - sum(counts.values())]:
        counts[m] += 1
    return {m: c for m, c in counts.items() if c > 0}


class BatchSampler:
    """Global batches of :class:`Example` for each step.

    Args:
        queries: the train queries (those with at least one purchase in ``positives`` are used).
        positives: query id → purchased product ids.
        catalog: the product catalog (indices, hard-negative pools).
        batch_size: global batch size (all ranks together).
        mix: modality weights, e.g. ``{"image": 12, "text": 3, "multimodal": 2}``.
        hard: hard negatives per query (0 = none).
        seed: the run's seed.
    """

    def __init__(
        self,
        queries: Sequence[Query],
        positives: dict[str, set[str]],
        catalog: ProductCatalog,
        *,
        batch_size: int,
        mix: dict[str, float],
        hard: int = 0,
        seed: int = 0,
    ):
        self.catalog = catalog
        self.hard = hard
        self.seed = seed
        self.batch_size = batch_size
        self.queries: list[Query] = []
        self.positive_ids: list[list[int]] = []
        for q in queries:
            bought = sorted(catalog.index[p] for p in positives.get(q.id, ()) if p in catalog.index)
            if bought and q.modality in _MODALITY_TAG:
                self.queries.append(q)
                self.positive_ids.append(bought)
        if not self.queries:
            raise DataError("the train split has no query with a purchased product in the store; nothing to train on")
        self.pools: dict[str, np.ndarray] = {}
        for m in _MODALITY_TAG:
            idx = [i for i, q in enumerate(self.queries) if q.modality == m]
            if idx:
                self.pools[m] = np.array(idx, dtype=np.int64)
        self.counts = modality_counts(batch_size, mix, list(self.pools))
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def _perm(self, modality: str, epoch: int) -> np.ndarray:
        key = (modality, epoch)
        if key not in self._perms:
            if len(self._perms) > 16:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, _MODALITY_TAG[modality], epoch, 7])
            self._perms[key] = self.pools[modality][rng.permutation(len(self.pools[modality]))]
        return self._perms[key]

    def batch(self, step: int) -> list[Example]:
        """The global batch of ``step`` (0-based), in a seeded order mixing the modalities."""
        chosen: list[int] = []
        for m, count in self.counts.items():
            n = len(self.pools[m])
            for t in range(step * count, (step + 1) * count):
                chosen.append(int(self._perm(m, t // n)[t % n]))
        rng = np.random.default_rng([self.seed, step, 11])
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        examples = []
        for qi in chosen:
            bought = self.positive_ids[qi]
            pos = bought[int(rng.integers(len(bought)))] if len(bought) > 1 else bought[0]
            hard: list[int] = []
            if self.hard > 0:
                pool = self.catalog.hard_pool(pos, self.hard)
                if not pool:
                    raise DataError(
                        f"product {self.catalog.products[pos].id!r}: every product is its duplicate; no hard negative exists"
                    )
                pick = rng.choice(len(pool), size=self.hard, replace=len(pool) < self.hard)
                hard = [pool[int(j)] for j in pick]
            examples.append(Example(self.queries[qi], pos, hard))
        return examples
