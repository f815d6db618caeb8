"""A tiny store with known boxes: a textured object pasted on white (clean) or clutter (scene)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from moon.data import Box, Product, Purchase, Query, write_store

SIZE = 96


def draw_object(rng: np.random.Generator, kind: str) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """An RGB image and the true box of the object pasted on it."""
    if kind == "clean":
        bg = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
        side = int(rng.integers(40, 70))
    else:
        arr = rng.integers(0, 256, size=(SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
        bg = Image.fromarray(arr).resize((SIZE, SIZE), Image.NEAREST)
        side = int(rng.integers(24, 40))
    x0 = int(rng.integers(0, SIZE - side))
    y0 = int(rng.integers(0, SIZE - side))
    draw = ImageDraw.Draw(bg)
    colour = tuple(int(c) for c in rng.integers(0, 200, size=3))
    draw.ellipse([x0, y0, x0 + side - 1, y0 + side - 1], fill=colour, outline=(0, 0, 0), width=2)
    draw.line([x0 + 4, y0 + side // 2, x0 + side - 5, y0 + side // 2], fill=(255, 255, 0), width=3)
    return bg, (x0, y0, x0 + side, y0 + side)


def make_store(root, n_products: int = 10, seed: int = 0, bad_image: bool = False):
    """Write a store: each product has one clean and one scene image; one image query per product."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    products, queries, purchases, boxes = [], [], [], []
    for i in range(n_products):
        images = []
        for kind in ("clean", "scene"):
            im, box = draw_object(rng, kind)
            rel = f"images/p{i}_{kind}.jpg"
            im.save(root / rel, quality=92)
            images.append(root / rel)
            boxes.append(Box(image=rel, x0=box[0], y0=box[1], x1=box[2], y1=box[3], source="truth", kind=kind))
        products.append(Product(id=f"p{i}", title=f"round thing {i}", images=images, category=["A", "B"]))
        im, box = draw_object(rng, "scene")
        qrel = f"images/q{i}.jpg"
        im.save(root / qrel, quality=92)
        boxes.append(Box(image=qrel, x0=box[0], y0=box[1], x1=box[2], y1=box[3], source="truth", kind="query"))
        split = "test" if i % 3 == 0 else "train"
        queries.append(Query(id=f"q{i}", text="round thing", images=[root / qrel], split=split))
        purchases.append(Purchase(f"q{i}", f"p{i}", 0, ""))
    if bad_image:
        (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        products.append(Product(id="pbad", title="broken", images=[root / "images" / "broken.jpg"]))
    return write_store(root, products, queries, purchases, boxes)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The shared CI machine is small: one intra-op thread avoids oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_store(tmp_path):
    return make_store(tmp_path / "store", n_products=9, seed=1, bad_image=True)
