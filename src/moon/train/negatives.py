"""Which candidates each query may use as negatives: the candidate layout and the false-negative guard.

The product pool of a rank is ``[positives of its queries] + [their hard negatives]`` (``B_local *
(1 + k)`` rows). With spatial negatives the pools of all ranks are gathered in rank order, then the
live memory-queue entries follow. For query ``i`` a column is allowed when

* it is ``i``'s own positive (the label), or
* it is another query's positive and ``in_batch`` is on, or
* it is a hard negative and either belongs to ``i`` or ``in_batch`` is on (hard negatives of other
  queries are in-batch negatives too), or
* it is a live queue entry,

and, with the guard on, it is not a false negative: not in the duplicate cluster of ``i``'s positive
(same id, group, title or image hash), and not bought after any train query with ``i``'s text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moon.train.catalog import ProductCatalog, normalise_text
from moon.train.sampler import Example

KIND_POSITIVE, KIND_HARD, KIND_QUEUE = 0, 1, 2


@dataclass
class NegativeSettings:
    in_batch: bool = True
    hard: int = 0
    spatial: bool = True
    guard: bool = True


@dataclass
class CandidateLayout:
    """Masks for one rank's queries.

    Attributes:
        allowed: ``(n_local, n_cols)`` bool, query → candidate (positive included).
        positive: ``(n_local,)`` column of each query's positive.
        columns: ``(n_cols,)`` catalog index of every candidate column.
        sym_allowed / sym_positive: the product → query direction (``None`` unless requested).
    """

    allowed: np.ndarray
    positive: np.ndarray
    columns: np.ndarray
    sym_allowed: np.ndarray | None = None
    sym_positive: np.ndarray | None = None

    @property
    def negatives_per_query(self) -> np.ndarray:
        """``(n_local,)`` effective number of negatives of each query."""
        return self.allowed.sum(axis=1) - 1


def local_pool(examples: Sequence[Example]) -> list[int]:
    """Catalog indices of one rank's product pool: positives, then the hard negatives in order."""
    return [e.positive for e in examples] + [h for e in examples for h in e.hard]


def guard_mask(catalog: ProductCatalog, query_text: str | None, positive: int, columns: np.ndarray) -> np.ndarray:
    """``(n_cols,)`` bool, True where the candidate is a false negative for this query."""
    bad = catalog.cluster[columns] == catalog.cluster[positive]
    bought = catalog.bought_after_text.get(normalise_text(query_text))
    if bought:
        bad |= np.isin(columns, np.fromiter(bought, dtype=np.int64))
    return bad


def candidate_layout(
    examples: Sequence[Example],
    *,
    rank: int,
    world_size: int,
    settings: NegativeSettings,
    catalog: ProductCatalog,
    queue_products: np.ndarray | None = None,
    symmetric: bool = False,
) -> CandidateLayout:
    """Build the masks of rank ``rank`` for the global batch ``examples`` (see the module docstring)."""
    n = len(examples)
    if n % world_size:
        raise ValueError(f"global batch {n} is not divisible by {world_size} ranks")
    n_local = n // world_size
    k = settings.hard
    ranks = list(range(world_size)) if settings.spatial else [rank]
    cols, kinds, owners = [], [], []
    for r in ranks:
        part = examples[r * n_local : (r + 1) * n_local]
        for j, e in enumerate(part):
            cols.append(e.positive)
            kinds.append(KIND_POSITIVE)
            owners.append(r * n_local + j)
        for j, e in enumerate(part):
            if len(e.hard) != k:
                raise ValueError(f"example {r * n_local + j} has {len(e.hard)} hard negatives, expected {k}")
            cols.extend(e.hard)
            kinds.extend([KIND_HARD] * k)
            owners.extend([r * n_local + j] * k)
    queue = np.asarray(queue_products if queue_products is not None else [], dtype=np.int64)
    cols.extend(queue.tolist())
    kinds.extend([KIND_QUEUE] * len(queue))
    owners.extend([-1] * len(queue))
    columns = np.array(cols, dtype=np.int64)
    kind = np.array(kinds, dtype=np.int64)
    owner = np.array(owners, dtype=np.int64)
    pool_size = n_local * (1 + k)
    base = ranks.index(rank) * pool_size

    allowed = np.zeros((n_local, len(columns)), dtype=bool)
    positive = np.arange(n_local, dtype=np.int64) + base
    for li in range(n_local):
        gi = rank * n_local + li
        e = examples[gi]
        row = kind == KIND_QUEUE
        if settings.in_batch:
            row |= kind != KIND_QUEUE
        row |= (kind == KIND_HARD) & (owner == gi)
        if settings.guard:
            row &= ~guard_mask(catalog, e.query.text, e.positive, columns)
        row[positive[li]] = True
        allowed[li] = row

    sym_allowed = sym_positive = None
    if symmetric:
        q_owner = np.array([r * n_local + j for r in ranks for j in range(n_local)], dtype=np.int64)
        q_pos = np.array([examples[g].positive for g in q_owner], dtype=np.int64)
        sym_allowed = np.zeros((n_local, len(q_owner)), dtype=bool)
        sym_positive = np.arange(n_local, dtype=np.int64) + ranks.index(rank) * n_local
        for li in range(n_local):
            gi = rank * n_local + li
            row = np.full(len(q_owner), settings.in_batch)
            if settings.guard:
                # another query is a false negative when it bought a duplicate of this product
                row &= catalog.cluster[q_pos] != catalog.cluster[examples[gi].positive]
            row[sym_positive[li]] = True
            sym_allowed[li] = row
    return CandidateLayout(allowed, positive, columns, sym_allowed, sym_positive)
