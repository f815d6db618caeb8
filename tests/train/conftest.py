"""Fixtures: a small text-first product store (with a few image files) built by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

COLORS = ["red", "blue", "green", "black", "white"]
BRANDS = ["acme", "zeta", "nova", "orion"]
LEAVES = [
    ("Home", "Kitchen", "Mugs"),
    ("Home", "Kitchen", "Pans"),
    ("Home", "Bath", "Towels"),
    ("Toys", "Outdoor", "Balls"),
    ("Toys", "Outdoor", "Kites"),
    ("Toys", "Puzzles", "Jigsaw"),
]


def make_store(root: Path, *, n_products: int = 48, n_queries: int = 160, seed: int = 0) -> Path:
    """Products over 6 leaves (3 levels), a duplicate listing every 12th product, two products
    sharing one image file's bytes; text/image/multimodal queries each bought one product."""
    from moon.data import Product, Purchase, Query, StoreWriter

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    products = []
    for i in range(n_products):
        leaf = LEAVES[i % len(LEAVES)]
        color, brand = COLORS[(i // 6) % len(COLORS)], BRANDS[(i // 30) % len(BRANDS)]
        img = root / "images" / f"p{i}.png"
        shade = (i * 37 % 256, i * 91 % 256, i * 13 % 256)
        if i == 5:  # p5's picture is byte-identical to p4's: the guard must treat them as duplicates
            shade = (4 * 37 % 256, 4 * 91 % 256, 4 * 13 % 256)
        Image.new("RGB", (8, 8), shade).save(img)
        group = f"g{i - 1}" if i % 12 == 11 else f"g{i}"
        products.append(
            Product(
                id=f"p{i}",
                title=f"{brand} {color} {leaf[2].lower()} item{i}",
                images=[img],
                category=list(leaf),
                group=group,
            )
        )
    queries, purchases = [], []
    for j in range(n_queries):
        target = int(rng.integers(n_products))
        p = products[target]
        words = p.title.split()
        split = "val" if j % 5 == 4 else "train"
        kind = ["text", "text", "image", "multimodal"][j % 4]
        text = " ".join(words[1:3]) if kind != "image" else None
        images = []
        if kind != "text":
            qimg = root / "images" / f"q{j}_{words[3]}.png"
            Image.new("RGB", (8, 8), (j % 256, 10, 20)).save(qimg)
            images = [qimg]
        queries.append(Query(id=f"q{j}", text=text, images=images, split=split))
        purchases.append(Purchase(f"q{j}", p.id, 1_700_000_000 + j * 3600, "eu"))
    with StoreWriter(root, created={"tool": "tests"}) as w:
        w.add_all(products + queries + purchases)
    return root


@pytest.fixture
def store_factory():
    """:func:`make_store` as a fixture (test modules cannot ``import conftest`` reliably: pytest
    puts every test folder's conftest under the one module name)."""
    return make_store


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "store")


@pytest.fixture(scope="session")
def hardening_store(tmp_path_factory) -> Path:
    """The hardening tests' tiny text-only store (:func:`helpers.hardening_store_at`), built once."""
    from helpers import hardening_store_at

    return hardening_store_at(tmp_path_factory.mktemp("hardening") / "store")


@pytest.fixture(scope="session")
def hardening_run(hardening_store, tmp_path_factory) -> Path:
    """A finished 6-step toy run on :func:`hardening_store` with checkpoints at steps 2, 4 and 6,
    trained once for every module that needs it: tests copy it before changing anything."""
    from helpers import toy_run_config

    from moon.train import train

    out = tmp_path_factory.mktemp("hardening") / "run"
    train(toy_run_config(hardening_store, out))
    return out
