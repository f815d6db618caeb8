import pytest
from PIL import Image

from moon.data import Box, Product, Purchase, Query


@pytest.fixture
def tiny_records(tmp_path):
    """A few products, queries and purchases whose images live under ``tmp_path/store/images``."""
    root = tmp_path / "store"
    (root / "images").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), colour).save(root / "images" / f"p{i}.png")
    products = [
        Product(
            id=f"p{i}",
            title=f"Product {i} 运动鞋",
            images=[root / "images" / f"p{i}.png"],
            category=["Fashion", "Shoes", "Sneakers", f"Leaf{i % 2}"],
            attributes={"color": ["red", "dark red"] if i == 0 else ["green"], "brand": [f"b{i}"]},
            group="g0" if i < 2 else None,
        )
        for i in range(3)
    ]
    queries = [
        Query(id="q0", text="red sneaker", split="train"),
        Query(id="q1", text=None, images=[root / "images" / "p1.png"], split="val"),
        Query(id="q2", text="blue shoe", images=[root / "images" / "p2.png"], split="test"),
    ]
    purchases = [
        Purchase("q0", "p0", 1_700_000_000, "cn"),
        Purchase("q1", "p1", 1_700_000_100, "us"),
        Purchase("q2", "p2", 0, ""),
    ]
    boxes = [Box(image="images/p0.png", x0=1, y0=2, x1=10, y1=12, source="truth", kind="clean")]
    return root, products, queries, purchases, boxes
