"""The images of a store with their true boxes, and the detector train/test split.

Split rule (documented in ``docs/regions.md``):

* a query image belongs to its query's split (``train``/``val``/``test``);
* a product image belongs to ``test`` when ``sha1(product id)`` falls in the held-out fraction
  (default 20 %), otherwise to ``train`` (duplicate listings are separate products).

The learned detector trains on ``train`` images only, so no held-out listing or test query photo
is ever seen in training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moon.data import ProductStore


@dataclass(frozen=True)
class ImageSample:
    """One store image: ``image`` (store-relative path), the text describing it, its kind and split,
    and the true box ``(x0, y0, x1, y1)`` when ``boxes.parquet`` has one (``source=truth``)."""

    image: str
    title: str | None
    kind: str
    split: str
    truth: tuple[float, float, float, float] | None = None


def _held_out(product_id: str, fraction: float) -> bool:
    digest = hashlib.sha1(product_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def iter_samples(store: ProductStore, *, test_fraction: float = 0.2) -> Iterator[ImageSample]:
    """Every distinct image of products then queries, in store order, with split and truth."""
    truth: dict[str, tuple[tuple[float, float, float, float], str | None]] = {}
    for b in store.iter_boxes(source="truth"):
        truth.setdefault(b.image, (b.xyxy, b.kind))
    seen: set[str] = set()
    root = store.root

    def rel(path: object) -> str:
        return Path(str(path)).relative_to(root).as_posix()

    for product in store.iter_products():
        split = "test" if _held_out(product.id, test_fraction) else "train"
        for img in map(rel, product.images):
            if img in seen:
                continue
            seen.add(img)
            box, kind = truth.get(img, (None, None))
            yield ImageSample(img, product.title or None, kind or "listing", split, box)
    for query in store.iter_queries():
        for img in map(rel, query.images):
            if img in seen:
                continue
            seen.add(img)
            box, kind = truth.get(img, (None, None))
            yield ImageSample(img, query.text or None, kind or "query", query.split or "test", box)
