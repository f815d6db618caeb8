"""A tiny deterministic embedder and a small product store shared by the index and serve tests.

``ToyEmbedder``: 16-d unit vectors; dims 0..11 hash the lowercase words of the text (sha1, signed),
dims 12..14 carry the mean RGB colour of the images (scaled), dim 15 is a constant bias. So a query
"red shoe" lands next to the product titled "red shoe", and a red photo next to red products.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from moon.data import Product, Query, load_image, write_store

DIM = 16
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 220, 10)}
ITEMS = ["shoe", "bag", "hat"]


def _word_vector(text: str) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float64)
    for word in text.lower().split():
        h = hashlib.sha1(word.encode()).digest()
        v[h[0] % 12] += 1.0 if h[1] % 2 else -1.0
    return v


def _colour_vector(images: Sequence) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float64)
    if images:
        means = [np.asarray(load_image(img), dtype=np.float64).reshape(-1, 3).mean(0) / 255.0 for img in images]
        v[12:15] = 2.0 * np.mean(means, axis=0)
    return v


def _unit(rows: list[np.ndarray]) -> np.ndarray:
    out = np.stack(rows).astype(np.float32) if rows else np.zeros((0, DIM), np.float32)
    out[:, 15] += 0.1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class ToyEmbedder:
    """Deterministic text-hash + mean-colour embedder (see the module docstring)."""

    def __init__(self, salt: str = ""):
        self.name = "toy" + (f":{salt}" if salt else "")
        self.dim = DIM
        self.salt = salt

    def fingerprint(self) -> str:
        return hashlib.sha1(f"toy-v1{self.salt}".encode()).hexdigest()

    def encode_products(self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False):
        return _unit([_word_vector(p.title) + _colour_vector(p.images) for p in products])

    def encode_queries(self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False):
        return _unit([_word_vector(q.text or "") + _colour_vector(q.images) for q in queries])


def make_toy_store(root):
    """12 products ``<colour>-<item>`` titled "<colour> <item>", one solid-colour 24×24 PNG each."""
    (root / "images").mkdir(parents=True)
    products = []
    for colour, rgb in COLOURS.items():
        for item in ITEMS:
            pid = f"{colour}-{item}"
            path = root / "images" / f"{pid}.png"
            Image.new("RGB", (24, 24), rgb).save(path)
            products.append(Product(id=pid, title=f"{colour} {item}", images=[path], category=["Fashion", item]))
    return write_store(root, products, [Query(id="q0", text="red shoe")], [])


@pytest.fixture
def toy_embedder() -> ToyEmbedder:
    return ToyEmbedder()


@pytest.fixture
def other_embedder() -> ToyEmbedder:
    """Same family, different fingerprint (a 'different model')."""
    return ToyEmbedder(salt="other")


@pytest.fixture
def toy_store(tmp_path):
    return make_toy_store(tmp_path / "store")


@pytest.fixture
def toy_family(toy_embedder):
    """Registers the ToyEmbedder as family ``toy`` (``--model toy`` works in this process;
    ``toy:SALT`` gives another fingerprint)."""
    from moon.models import Family, register_family, unregister_family

    toy_class = type(toy_embedder)
    register_family(Family("toy", lambda arg: toy_class(arg or "")))
    yield
    unregister_family("toy")
