"""Opening a product store for training: train/val queries, their purchases, the catalog."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moon.data import ProductStore, Query
from moon.errors import DataError
from moon.train.catalog import ImageHashCache, ProductCatalog


@dataclass
class TrainingData:
    store: ProductStore
    catalog: ProductCatalog
    train_queries: list[Query]
    train_positives: dict[str, set[str]]
    val_queries: list[Query]
    val_positives: dict[str, set[str]]


def open_training_data(
    store_dir: str | os.PathLike,
    *,
    crop_source: str | None = None,
    hash_cache: str | os.PathLike | None = None,
    image_guard: bool = True,
) -> TrainingData:
    """Load products, train/val queries and purchases; build the catalog (duplicate clusters use
    image hashes cached in ``hash_cache`` when ``image_guard``)."""
    store = ProductStore(store_dir, crop_source=crop_source) if crop_source else ProductStore(store_dir)
    products = store.products()
    if not products:
        raise DataError(f"{store_dir}: the store has no products")
    train_positives = store.positives("train")
    train_queries = [q for q in store.queries("train") if q.id in train_positives]
    if not train_queries:
        raise DataError(f"{store_dir}: no train query has a purchase; nothing to train on")
    val_positives = store.positives("val")
    val_queries = [q for q in store.queries("val") if q.id in val_positives]
    hashes = ImageHashCache(Path(hash_cache) if hash_cache else None) if image_guard else None
    catalog = ProductCatalog(products, train_positives, train_queries, hashes)
    if hashes is not None:
        hashes.save()
    return TrainingData(store, catalog, train_queries, train_positives, val_queries, val_positives)
