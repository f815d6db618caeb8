"""A small product store and two embedders for the ``moon embed`` tests.

``CountingEmbedder`` (family ``count``, registered by the ``count_family`` fixture): deterministic
16-d unit vectors from a hash of each title; it records every product it encodes and can be told
to fail after encoding a number of products (an interrupted run). ``moon-tiny`` (a 2-layer
Qwen2.5-VL built from its preset) checks that shards hold exactly what ``encode_products`` gives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon.data import Product, Query, write_store

DIM = 16
COLOURS = [(220, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 10), (200, 200, 200)]
ITEMS = ["shoe", "bag", "hat", "scarf", "mug"]


class Interrupted(RuntimeError):
    """Raised by a CountingEmbedder told to stop (stands in for a killed process)."""


class CountingEmbedder:
    """Title-hash embedder that counts what it encodes (see the module docstring)."""

    def __init__(self, salt: str = "", fail_after: int | None = None):
        self.name = "count" + (f":{salt}" if salt else "")
        self.dim = DIM
        self.salt = salt
        self.fail_after = fail_after
        self.encoded: list[str] = []
        self.calls = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(f"count-v1{self.salt}".encode()).hexdigest()[:16]

    def _vector(self, text: str) -> np.ndarray:
        digest = hashlib.sha256((self.salt + text).encode()).digest()
        v = np.frombuffer(digest[:DIM], dtype=np.uint8).astype(np.float32) - 127.5
        return v / np.linalg.norm(v)

    def encode_products(self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False):
        if self.fail_after is not None and len(self.encoded) + len(products) > self.fail_after:
            raise Interrupted(f"stopped after {len(self.encoded)} products")
        self.calls += 1
        self.encoded.extend(p.id for p in products)
        return np.stack([self._vector(p.title) for p in products]).astype(np.float32)

    def encode_queries(self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False):
        return np.stack([self._vector(q.text or "") for q in queries]).astype(np.float32)


def build_store(root: Path, n_products: int = 25, *, prefix: str = "p") -> Path:
    """``n_products`` products ``{prefix}0 …`` with one 16×16 photo each, and 3 queries."""
    (root / "images").mkdir(parents=True)
    products = []
    for i in range(n_products):
        image = root / "images" / f"{prefix}{i}.png"
        Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)]).save(image)
        title = f"{['red', 'green', 'blue', 'yellow', 'grey'][i % 5]} {ITEMS[(i // 5) % 5]} number {i}"
        products.append(
            Product(id=f"{prefix}{i}", title=title, images=[image], category=["Fashion", ITEMS[(i // 5) % 5]])
        )
    queries = [Query(id=f"q{j}", text=f"red {ITEMS[j]}") for j in range(3)]
    write_store(root, products, queries, [])
    return root


@pytest.fixture
def store(tmp_path) -> Path:
    return build_store(tmp_path / "store")


@pytest.fixture
def store_factory():
    """:func:`build_store` itself (test modules do not import conftest)."""
    return build_store


@pytest.fixture
def counting():
    """``counting(salt="", fail_after=None)`` → a new :class:`CountingEmbedder`."""
    return CountingEmbedder


@pytest.fixture
def interrupted():
    """The exception a :class:`CountingEmbedder` raises when told to stop."""
    return Interrupted


@pytest.fixture
def count_family():
    """Registers :class:`CountingEmbedder` as family ``count`` (``--model count``; ``count:SALT``
    gives another fingerprint) for this test."""
    from moon.models import Family, register_family, unregister_family

    register_family(Family("count", lambda arg: CountingEmbedder(arg or "")))
    yield
    unregister_family("count")


@pytest.fixture(scope="module")
def tiny_model():
    import torch

    from moon.models import load_embedder

    torch.set_num_threads(1)
    return load_embedder("moon-tiny")
