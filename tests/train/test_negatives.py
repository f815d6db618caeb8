"""Done-criterion 4: the memory queue's size and age limits; the false-negative guard."""

from __future__ import annotations

import numpy as np
import torch

from moon.data import Product, Query
from moon.train.catalog import ImageHashCache, ProductCatalog
from moon.train.memory import MemoryQueue
from moon.train.negatives import NegativeSettings, candidate_layout
from moon.train.sampler import Example


def test_queue_keeps_at_most_size_entries_in_fifo_order():
    q = MemoryQueue(size=5, dim=2, max_age=100)
    for step in range(4):
        q.push(torch.full((2, 2), float(step)), torch.tensor([10 * step, 10 * step + 1]), step)
    vecs, prods, ages = q.live(4)
    assert len(q) == 5 and len(vecs) == 5
    # the 8 pushed entries overwrote the 3 oldest: products of steps 1 (one left), 2 and 3 remain
    assert sorted(prods.tolist()) == [11, 20, 21, 30, 31]
    assert sorted(ages.tolist()) == [1, 1, 2, 2, 3]
    # a push larger than the queue keeps its last `size` rows
    q.push(torch.zeros(7, 2), torch.arange(100, 107), 5)
    assert sorted(q.live(5)[1].tolist()) == list(range(102, 107))


def test_queue_drops_entries_older_than_max_age():
    q = MemoryQueue(size=10, dim=2, max_age=2)
    for step in range(5):
        q.push(torch.ones(1, 2) * step, torch.tensor([step]), step)
    _, prods, ages = q.live(5)
    assert sorted(prods.tolist()) == [3, 4]  # ages 2 and 1; steps 0..2 are older than 2
    assert ages.max() <= 2
    assert len(q) == 2  # expired entries are gone for good
    q0 = MemoryQueue(size=4, dim=2, max_age=0)
    q0.push(torch.ones(2, 2), torch.tensor([1, 2]), 0)
    assert len(q0.live(1)[1]) == 0


def test_queue_state_round_trip():
    q = MemoryQueue(size=4, dim=3, max_age=5)
    q.push(torch.randn(3, 3), torch.tensor([1, 2, 3]), 0)
    r = MemoryQueue(size=4, dim=3, max_age=5)
    r.load_state_dict(q.state_dict())
    for a, b in zip(q.live(1), r.live(1), strict=True):
        assert torch.equal(a, b)
    assert r.ptr == q.ptr


def _catalog(tmp_path):
    from PIL import Image

    img_a, img_b, img_c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(img_a)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(img_b)  # same bytes as a.png
    Image.new("RGB", (4, 4), (9, 9, 9)).save(img_c)
    products = [
        Product("p0", "red mug", images=[img_a], category=["Home", "Mugs"], group="g0"),
        Product("p1", "Red  Mug", images=[img_c], category=["Home", "Mugs"]),  # same title (normalised)
        Product("p2", "blue mug", images=[img_b], category=["Home", "Mugs"]),  # same image bytes as p0
        Product("p3", "green mug", images=[img_c], category=["Home", "Mugs"], group="g3"),
        Product("p4", "green mug xl", category=["Home", "Mugs"], group="g3"),  # duplicate listing of p3
        Product("p5", "yellow mug", category=["Home", "Mugs"]),  # bought after the same query text as p0
        Product("p6", "black pan", category=["Home", "Pans"]),
        Product("p7", "white pan", category=["Home", "Pans"]),
    ]
    queries = [Query("q0", "red mug cheap", split="train"), Query("q1", "Red mug  CHEAP", split="train")]
    catalog = ProductCatalog(products, {"q0": {"p0"}, "q1": {"p5"}}, queries, ImageHashCache(tmp_path / "h.json"))
    return products, catalog


def test_guard_clusters_same_id_title_image_and_group(tmp_path):
    _, catalog = _catalog(tmp_path)
    c = catalog.cluster
    # p0 ~ p1 (title) ~ p2 (image bytes) and p1 ~ p3 (image c) ~ p4 (group): one transitive cluster
    assert c[0] == c[1] == c[2] == c[3] == c[4]
    assert len({c[0], c[5], c[6], c[7]}) == 4
    assert catalog.bought_after_text["red mug cheap"] == {0, 5}


def test_layout_guard_and_queue_never_hold_the_own_positive(tmp_path):
    _, catalog = _catalog(tmp_path)
    examples = [
        Example(Query("q0", "red mug cheap"), positive=0),
        Example(Query("qx", "pan"), positive=6),
        Example(Query("qy", "mug"), positive=5),
        Example(Query("qz", "other"), positive=0),  # the same product again in the batch
    ]
    queue = np.array([0, 2, 5, 6, 7, 4])
    layout = candidate_layout(
        examples, rank=0, world_size=1, settings=NegativeSettings(), catalog=catalog, queue_products=queue
    )
    cols = layout.columns
    assert cols.tolist() == [0, 6, 5, 0, 0, 2, 5, 6, 7, 4]
    row = layout.allowed[0]
    assert row[layout.positive[0]]
    negatives = {int(cols[j]) for j in np.flatnonzero(row) if j != layout.positive[0]}
    # q0 bought p0: p0 (again in batch and in queue), its duplicates p2/p4 and p5 (same query text) are removed
    assert negatives == {6, 7}
    assert layout.negatives_per_query[0] == 3  # p6 in batch, p6 and p7 from the queue
    # a query whose text nobody else typed keeps p5 as a negative but never its own positive's cluster
    row3 = layout.allowed[3]
    assert {int(cols[j]) for j in np.flatnonzero(row3) if j != layout.positive[3]} == {6, 5, 7}
    # the own positive never appears as a negative, in-batch or in the queue
    for i, e in enumerate(examples):
        own = np.flatnonzero(cols == e.positive)
        assert all((not layout.allowed[i][j]) or j == layout.positive[i] for j in own)


def test_guard_off_and_in_batch_off(tmp_path):
    _, catalog = _catalog(tmp_path)
    examples = [
        Example(Query("q0", "red mug cheap"), positive=0, hard=[5]),
        Example(Query("q1", "pan"), positive=6, hard=[7]),
    ]
    off = candidate_layout(
        examples, rank=0, world_size=1, settings=NegativeSettings(hard=1, guard=False), catalog=catalog
    )
    assert off.negatives_per_query.tolist() == [3, 3]
    alone = candidate_layout(
        examples, rank=0, world_size=1, settings=NegativeSettings(hard=1, in_batch=False), catalog=catalog
    )
    # only the own hard negative: q0's (p5) is guarded (same query text bought it), q1's (p7) is kept
    assert alone.negatives_per_query.tolist() == [0, 1]
