"""Helpers of the benchmark tests: a small hand-written store and embedders with known behaviour."""

from __future__ import annotations

import copy

import numpy as np
from PIL import Image

from moon.data import Product, Purchase, Query, write_store
from moon.models.baselines.chance import RandomEmbedder

LEAVES = [
    ["Fashion", "Shoes", "Sneakers"],
    ["Fashion", "Shoes", "Boots"],
    ["Fashion", "Bags", "Tote"],
    ["Home", "Kitchen", "Mug"],
    ["Home", "Garden"],  # a shallower path: absent from level 3
]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "black": (10, 10, 10)}


def build_store(root):
    """16 products (3 duplicate groups), queries of every modality in test/val, one with 2 purchases."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    products, queries, purchases = [], [], []
    names = list(COLOURS)
    for i in range(16):
        colour = names[i % 4]
        path = root / "images" / f"p{i}.png"
        shade = tuple(min(255, c + 5 * (i // 4)) for c in COLOURS[colour])
        Image.new("RGB", (24, 20), shade).save(path)
        images = [path]
        if i % 3 == 0:
            second = root / "images" / f"p{i}b.png"
            Image.new("RGB", (20, 24), shade[::-1]).save(second)
            images.append(second)
        attrs = {"color": [colour]}
        if i % 2 == 0:
            attrs["material"] = ["cotton", "leather"] if i % 4 == 0 else ["rubber"]
        group = {0: "g0", 5: "g0", 3: "g1", 9: "g1", 12: "g1", 7: "g2", 8: "g2"}.get(i)
        products.append(
            Product(
                id=f"p{i}",
                title=f"{colour} item {i}",
                images=images,
                category=LEAVES[i % 5],
                attributes=attrs,
                group=group,
            )
        )
    qi = 0
    for split, pids in (("test", range(0, 12)), ("val", range(12, 16))):
        for j, pid in enumerate(pids):
            kind = ("text", "image", "multimodal")[j % 3]
            qpath = root / "images" / f"q{qi}.png"
            Image.new("RGB", (16, 16), COLOURS[names[pid % 4]]).save(qpath)
            text = None if kind == "image" else f"{names[pid % 4]} thing {pid}"
            images = [] if kind == "text" else [qpath]
            queries.append(Query(id=f"q{qi}", text=text, images=images, split=split))
            purchases.append(Purchase(f"q{qi}", f"p{pid}", 1_700_000_000 + qi))
            qi += 1
    purchases.append(Purchase("q0", "p4", 1_700_000_500))  # several purchased products for one query
    queries.append(Query(id="q-nobuy", text="nothing bought", split="test"))  # no purchase: not scored
    write_store(root, products, queries, purchases)
    return root


class SpyEmbedder(RandomEmbedder):
    """The random baseline that records deep copies of every record it is asked to encode."""

    def __init__(self):
        super().__init__(dim=32, seed=1)
        self.name = "spy"
        self.product_calls: list[list] = []
        self.query_calls: list[list] = []

    def encode_products(self, products, **kw):
        self.product_calls.append(copy.deepcopy(list(products)))
        return super().encode_products(products, **kw)

    def encode_queries(self, queries, **kw):
        self.query_calls.append(copy.deepcopy(list(queries)))
        return super().encode_queries(queries, **kw)


class OracleEmbedder:
    """Products → one-hot by catalogue position; a query → the sum of its purchased products' one-hots.

    Label texts ``color: <c>`` → a one-hot in a colour block; a product also gets that block from the
    colour word that starts its title (so colour prediction is perfect).
    """

    name = "oracle"

    def __init__(self, product_ids, positives, colours):
        self.pos = {pid: i for i, pid in enumerate(product_ids)}
        self.positives = positives
        self.colours = list(colours)
        self.dim = len(product_ids) + len(self.colours) + 1

    def fingerprint(self):
        return "oracle"

    def _unit(self, m):
        return (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def encode_products(self, products, **kw):
        m = np.zeros((len(products), self.dim))
        for r, p in enumerate(products):
            m[r, self.pos[p.id]] = 1.0
            colour = p.title.split()[0]
            m[r, len(self.pos) + self.colours.index(colour)] = 1.0
        return self._unit(m)

    def encode_queries(self, queries, **kw):
        m = np.zeros((len(queries), self.dim))
        for r, q in enumerate(queries):
            if q.id.startswith("label:color: "):
                m[r, len(self.pos) + self.colours.index(q.text.split(": ")[1])] = 1.0
            elif q.id.startswith("label:"):
                m[r, -1] = 1.0
            else:
                for pid in self.positives.get(q.id, ()):
                    m[r, self.pos[pid]] = 1.0
        return self._unit(m)
