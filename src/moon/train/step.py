"""One contrastive training step's forward and backward (no optimizer): the unit the tests compare."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moon.train.catalog import ProductCatalog
from moon.train.chunked import forward_backward
from moon.train.collapse import mean_pairwise_cosine
from moon.train.distributed import DistContext, all_reduce_sum, gather_detached, gather_with_grad
from moon.train.losses import ContrastiveLoss
from moon.train.memory import MemoryQueue
from moon.train.negatives import NegativeSettings, candidate_layout, local_pool
from moon.train.sampler import Example


@dataclass
class StepResult:
    """Global numbers of one step (identical on every rank)."""

    loss: float
    contrastive: float
    aux: float
    negatives_per_query: float
    n_queries: int
    product_cosine: float = float("nan")


class ContrastiveStep:
    """Embeds one rank's share of a global batch, computes the loss and back-propagates.

    The loss is the mean over the *global* batch of per-query InfoNCE (plus the mean p→q term when
    ``symmetric``); each rank back-propagates its local sum × ``world_size`` / ``global batch``, so
    that averaging gradients over ranks gives exactly the single-process gradient.
    """

    def __init__(
        self,
        model: Any,
        loss: ContrastiveLoss,
        catalog: ProductCatalog,
        settings: NegativeSettings,
        *,
        queue: MemoryQueue | None = None,
        ctx: DistContext | None = None,
        symmetric: bool = False,
        chunk_size: int | None = None,
        aux_weight: float = 0.0,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        encode: Callable[[Any], torch.Tensor] | None = None,
    ):
        self.model = model
        self.loss = loss
        self.catalog = catalog
        self.settings = settings
        self.queue = queue
        self.ctx = ctx or DistContext()
        self.symmetric = symmetric
        self.chunk_size = chunk_size
        self.aux_weight = aux_weight
        self.autocast = autocast
        self.encode = encode
        self.input_warnings: dict[str, int] = {}

    def _report_input_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        """Input builders warn per record (truncation …): count them, show one example per kind."""
        for w in caught:
            kind = w.category.__name__
            self.input_warnings[kind] = self.input_warnings.get(kind, 0) + 1
            if self.input_warnings[kind] == 1:
                warnings.warn(
                    f"{w.message} (further {kind}s while building training inputs are counted, not shown)",
                    w.category,
                    stacklevel=2,
                )

    def local_examples(self, examples: Sequence[Example]) -> list[Example]:
        n_local = len(examples) // self.ctx.world_size
        return list(examples[self.ctx.rank * n_local : (self.ctx.rank + 1) * n_local])

    def __call__(self, examples: Sequence[Example], step: int) -> StepResult:
        """Forward + backward for the global batch ``examples`` at ``step``; gradients are local
        (average them over ranks with :func:`moon.train.distributed.average_gradients`)."""
        ctx = self.ctx
        if len(examples) % ctx.world_size:
            raise ValueError(f"global batch {len(examples)} is not divisible by {ctx.world_size} ranks")
        mine = self.local_examples(examples)
        pool = local_pool(mine)
        device = ctx.device
        if self.queue is not None and self.queue.size > 0:
            q_vecs, q_prods, _ = self.queue.live(step)
        else:
            q_vecs, q_prods = torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
        spatial = self.settings.spatial and ctx.distributed
        layout = candidate_layout(
            examples,
            rank=ctx.rank,
            world_size=ctx.world_size,
            settings=self.settings,
            catalog=self.catalog,
            queue_products=q_prods.numpy(),
            symmetric=self.symmetric,
        )
        allowed = torch.from_numpy(layout.allowed).to(device)
        positive = torch.from_numpy(layout.positive).to(device)
        n_global = len(examples)
        n_local = len(mine)

        def loss_fn(q: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            p_all = gather_with_grad(p, ctx) if spatial else p
            cands = torch.cat([p_all, q_vecs.to(p_all.device, p_all.dtype)]) if len(q_vecs) else p_all
            per_query = self.loss(q, cands, allowed, positive)
            total = per_query.sum()
            if self.symmetric:
                assert layout.sym_allowed is not None and layout.sym_positive is not None
                q_all = gather_with_grad(q, ctx) if spatial else q
                per_product = self.loss(
                    p[:n_local],
                    q_all,
                    torch.from_numpy(layout.sym_allowed).to(device),
                    torch.from_numpy(layout.sym_positive).to(device),
                )
                total = 0.5 * (total + per_product.sum())
            return total * ctx.world_size / n_global, {"local_sum": float(total.detach())}

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            query_items = self.model.build_query_inputs([e.query for e in mine])
            product_items = self.model.build_product_inputs([self.catalog.products[i] for i in pool])
        self._report_input_warnings(caught)
        _, p_reps, stats = forward_backward(
            self.model,
            query_items,
            product_items,
            loss_fn,
            chunk_size=self.chunk_size,
            aux_weight=self.aux_weight,
            autocast=self.autocast,
            encode=self.encode,
        )
        if self.queue is not None and self.queue.size > 0:
            # enqueue in the single-process order (all positives, then all hard negatives) so that
            # FIFO eviction, and hence training, does not depend on the number of processes
            order = _canonical_order(n_local, len(pool), ctx.world_size).to(device)
            all_reps = gather_detached(p_reps, ctx)[order]
            all_prods = gather_detached(torch.tensor(pool, dtype=torch.long, device=device), ctx)[order]
            self.queue.push(all_reps, all_prods.cpu(), step)
        contrastive = all_reduce_sum(stats["local_sum"], ctx) / n_global
        aux = all_reduce_sum(stats["aux"], ctx) / ctx.world_size
        negatives = all_reduce_sum(float(np.sum(layout.negatives_per_query)), ctx) / n_global
        positives = gather_detached(p_reps[:n_local], ctx) if ctx.distributed else p_reps[:n_local]
        return StepResult(
            loss=contrastive + self.aux_weight * aux,
            contrastive=contrastive,
            aux=aux,
            negatives_per_query=negatives,
            n_queries=n_global,
            product_cosine=mean_pairwise_cosine(positives),
        )


def _canonical_order(n_local: int, pool_size: int, world_size: int) -> torch.Tensor:
    """Indices turning rank-major gathered pools ``[pos_0, hard_0, pos_1, hard_1, …]`` into
    ``[pos_0, pos_1, …, hard_0, hard_1, …]`` (what one process holding the global batch has)."""
    starts = torch.arange(world_size) * pool_size
    positives = (starts[:, None] + torch.arange(n_local)).reshape(-1)
    hards = (starts[:, None] + n_local + torch.arange(pool_size - n_local)).reshape(-1)
    return torch.cat([positives, hards])
