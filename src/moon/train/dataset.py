"""Opening a product store for training: train/val queries, their purchases, the catalog.

Every image file that training and validation will read (products' images and crops, train and val
queries' images and crops) is checked with one ``stat`` each before the first step
(:func:`check_image_files`): a named pipe, device, socket or directory at an image path, a missing
file, a dangling symbolic link or a file over the image size limit would otherwise fail only when
its record is drawn — possibly after hours of training — or block the reader.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moon.data import Product, ProductStore, Query
from moon.data.images import MAX_BYTES_ENV, max_image_bytes
from moon.data.safe_open import FileRefusedError, check_regular
from moon.errors import DataError
from moon.train.catalog import ImageHashCache, ProductCatalog

#: how many bad image paths the error line names (it always says how many there are in all)
SHOWN_BAD_IMAGES = 3


@dataclass
class TrainingRecords:
    """What training reads from a store, before the catalog (and its image hashes) is built."""

    store: ProductStore
    products: list[Product]
    train_queries: list[Query]
    train_positives: dict[str, set[str]]
    val_queries: list[Query]
    val_positives: dict[str, set[str]]


@dataclass
class TrainingData:
    store: ProductStore
    catalog: ProductCatalog
    train_queries: list[Query]
    train_positives: dict[str, set[str]]
    val_queries: list[Query]
    val_positives: dict[str, set[str]]


def _image_paths(records: Iterable[Product | Query]) -> Iterator[str]:
    for r in records:
        for ref in (*r.images, *r.crops):
            if isinstance(ref, (str, os.PathLike)):
                yield os.fspath(ref)


def _image_problem(path: str, max_bytes: int) -> str | None:
    """``"<path>: <why it cannot be read>"`` for the image file ``path`` (one ``stat``, nothing
    opened), or ``None`` when it is a regular file within the image size limit."""
    try:
        st = check_regular(path, what="an image", label=path)
    except FileRefusedError as exc:
        if exc.reason == "file not found":
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    return f"{path}: a dangling symbolic link (to {os.readlink(path)})"
            except (OSError, ValueError):
                pass
        return f"{path}: {exc.reason}"
    if st.st_size > max_bytes:
        return f"{path}: too large ({st.st_size:,} bytes > limit {max_bytes:,} bytes; set {MAX_BYTES_ENV} to raise it)"
    return None


def check_image_files(store_dir: str | os.PathLike, records: Iterable[Product | Query]) -> int:
    """``stat`` every image path of ``records`` once (never opening one, so a FIFO cannot block);
    raise one :class:`DataError` line naming the first few bad ones and how many there are, else
    return how many distinct files were checked."""
    max_bytes = max_image_bytes()
    seen: set[str] = set()
    bad: list[str] = []
    for path in _image_paths(records):
        if path in seen:
            continue
        seen.add(path)
        problem = _image_problem(path, max_bytes)
        if problem is not None:
            bad.append(problem)
    if bad:
        shown = "; ".join(bad[:SHOWN_BAD_IMAGES])
        more = f"; … and {len(bad) - SHOWN_BAD_IMAGES:,} more" if len(bad) > SHOWN_BAD_IMAGES else ""
        raise DataError(
            f"{store_dir}: {len(bad):,} of the {len(seen):,} image files that training would read "
            f"{'is' if len(bad) == 1 else 'are'} not a readable image file: {shown}{more}. Nothing was trained; "
            "put regular image files at those paths or remove the records from the store "
            "(`moon data validate` lists the store's missing files)"
        )
    return len(seen)


def read_training_records(
    store_dir: str | os.PathLike, *, crop_source: str | None = None, check_images: bool = True
) -> TrainingRecords:
    """Products, train/val queries that have purchases, and those purchases; with ``check_images``
    every image file they name is checked first (:func:`check_image_files`). Cheap: no image is read."""
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
    if check_images:
        check_image_files(store_dir, [*products, *train_queries, *val_queries])
    return TrainingRecords(store, products, train_queries, train_positives, val_queries, val_positives)


def open_training_data(
    store_dir: str | os.PathLike,
    *,
    crop_source: str | None = None,
    hash_cache: str | os.PathLike | None = None,
    image_guard: bool = True,
    records: TrainingRecords | None = None,
) -> TrainingData:
    """Load products, train/val queries and purchases (or take ``records`` already read by
    :func:`read_training_records`, whose image files were checked); build the catalog (duplicate
    clusters use image hashes cached in ``hash_cache`` when ``image_guard``)."""
    r = records if records is not None else read_training_records(store_dir, crop_source=crop_source)
    hashes = ImageHashCache(Path(hash_cache) if hash_cache else None) if image_guard else None
    catalog = ProductCatalog(r.products, r.train_positives, r.train_queries, hashes)
    if hashes is not None:
        hashes.save()
    return TrainingData(r.store, catalog, r.train_queries, r.train_positives, r.val_queries, r.val_positives)
