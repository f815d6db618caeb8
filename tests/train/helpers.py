"""Shared test helpers: a toy training setup whose gradients can be compared exactly, and the
hardening tests' tiny store and 6-step toy run config."""

from __future__ import annotations

from pathlib import Path

import torch
from toy_embedder import ToyEmbedder

from moon.data import Product, Purchase, Query, StoreWriter
from moon.train import load_config
from moon.train.dataset import open_training_data
from moon.train.losses import ContrastiveLoss
from moon.train.memory import MemoryQueue
from moon.train.negatives import NegativeSettings
from moon.train.sampler import BatchSampler
from moon.train.step import ContrastiveStep

MIX = {"image": 12, "text": 3, "multimodal": 2}


def gradients_after_two_steps(
    store: Path,
    *,
    batch_size: int = 12,
    hard: int = 2,
    chunk_size: int | None = None,
    ctx=None,
    symmetric: bool = True,
    queue_size: int = 20,
    dropout: float = 0.0,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Run steps 0-2 without updates (the 20-entry queue overflows at once, so its FIFO order
    matters); return the three losses and the parameter gradients of step 2 (averaged over ranks
    when ``ctx`` is distributed)."""
    from moon.train.distributed import DistContext, average_gradients

    ctx = ctx or DistContext()
    data = open_training_data(store, image_guard=True)
    sampler = BatchSampler(
        data.train_queries, data.train_positives, data.catalog, batch_size=batch_size, mix=MIX, hard=hard, seed=3
    )
    torch.manual_seed(0)
    model = ToyEmbedder(dropout=dropout)
    loss = ContrastiveLoss(0.1, learnable=True)
    queue = MemoryQueue(queue_size, model.dim, max_age=3)
    step = ContrastiveStep(
        model,
        loss,
        data.catalog,
        NegativeSettings(hard=hard),
        queue=queue,
        ctx=ctx,
        symmetric=symmetric,
        chunk_size=chunk_size,
        aux_weight=0.1,
    )
    losses = []
    params = dict(model.named_parameters()) | {"log_scale": loss.log_scale}
    for s in range(3):
        for p in params.values():
            p.grad = None
        losses.append(step(sampler.batch(s), s).loss)
        average_gradients(list(params.values()), ctx)
    return losses, {k: p.grad.detach().clone() for k, p in params.items()}


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def hardening_store_at(root):
    """The hardening tests' tiny store: 8 leaves × 3 products; text queries: train ones buy one product, val ones buy two."""
    with StoreWriter(root, created={"tool": "tests"}) as w:
        for c in range(8):
            for j in range(3):
                w.add_product(Product(f"c{c}p{j}", f"thing {c} variant {j}", category=["Ind", f"Leaf{c}"]))
            w.add_query(Query(f"q{c}", f"looking for thing {c}", split="train"))
            w.add_purchase(Purchase(f"q{c}", f"c{c}p0", c))
            w.add_query(Query(f"v{c}", f"thing {c} please", split="val"))
            w.add_purchase(Purchase(f"v{c}", f"c{c}p1", 100 + c))
            w.add_purchase(Purchase(f"v{c}", f"c{(c + 3) % 8}p2", 200 + c))
    return root


def toy_run_config(store, out, steps=6, **run):
    return load_config(
        extra={
            "model": {"spec": "py:toy_embedder:make_toy"},
            "data": {"dir": str(store), "modality_mix": {"text": 1}},
            "negatives": {"hard": 1, "queue_size": 8, "queue_max_age": 2},
            "loss": {"learn_temperature": True},
            "optim": {"steps": steps, "batch_size": 4, "warmup_steps": 1},
            "run": {
                "out": str(out),
                "val_every": 2,
                "ckpt_every": 2,
                "keep_last": 3,
                "tensorboard": False,
                "progress": False,
                **run,
            },
        }
    )
