"""Shared test helpers: a toy training setup whose gradients can be compared exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from toy_embedder import ToyEmbedder

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
