"""Done-criterion 5: the logged effective negatives per query equal the count the config implies."""

from __future__ import annotations

from moon.data import Product, Purchase, Query, StoreWriter
from moon.train import load_config, train
from moon.train.metrics_log import read_metrics


def _store(root):
    """12 leaves × 3 products; one text query per leaf buying its first product."""
    with StoreWriter(root, created={"tool": "tests"}) as w:
        for c in range(12):
            for j in range(3):
                w.add_product(Product(f"c{c}p{j}", f"thing {c} variant {j}", category=["Ind", f"Leaf{c}"]))
            w.add_query(Query(f"q{c}", f"looking for thing {c}", split="train"))
            w.add_purchase(Purchase(f"q{c}", f"c{c}p0", c))
    return root


def test_logged_negatives_per_query_match_the_config(tmp_path):
    store = _store(tmp_path / "store")
    cfg = load_config(
        extra={
            "model": {"spec": "py:toy_embedder:make_toy"},
            "data": {"dir": str(store), "modality_mix": {"text": 1}},
            "negatives": {"in_batch": True, "hard": 2, "queue_size": 16, "queue_max_age": 2, "guard": True},
            "optim": {"steps": 3, "batch_size": 4, "warmup_steps": 0},
            "run": {
                "out": str(tmp_path / "run"),
                "val_every": 0,
                "ckpt_every": 0,
                "tensorboard": False,
                "progress": False,
            },
        }
    )
    train(cfg)
    got = [r["negatives_per_query"] for r in read_metrics(tmp_path / "run")]
    in_batch = 4 - 1  # the other queries' positives
    hard = 4 * 2  # every query's 2 hard negatives (the rest of its leaf), shared in-batch
    # step 1: empty queue; step 2: step 1's 12 products; step 3: 16 (the queue is full; step 1's
    # 4 survivors are 2 steps old, within max_age). No candidate is a duplicate of a positive:
    # each step draws new leaves (12 queries, 4 per step, no repeats within an epoch).
    assert got == [in_batch + hard, in_batch + hard + 12, in_batch + hard + 16]

    cfg.negatives.queue_max_age = 1
    cfg.negatives.in_batch = False
    cfg.run.out = str(tmp_path / "run2")
    train(cfg)
    got = [r["negatives_per_query"] for r in read_metrics(tmp_path / "run2")]
    # own 2 hard negatives + queue entries at most 1 step old (step 3: only step 2's 12 survive)
    assert got == [2, 2 + 12, 2 + 12]
