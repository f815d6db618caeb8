"""Encoding with gradients, whole or in chunks (GradCache, Gao et al. 2021).

Chunked: (1) embed every chunk without a graph, recording the RNG state before each chunk;
(2) compute the contrastive loss on those vectors (as leaves) and back-propagate to get
``dL/dvector``; (3) re-embed each chunk with a graph, replaying its RNG state (same dropout), and
back-propagate ``<vector, dL/dvector>``. Parameter gradients equal the unchunked ones while only
one chunk's activations are alive at a time.

The auxiliary (MoE balancing) loss of a chunked pass is the size-weighted mean of the chunks'
auxiliary losses (identical to the unchunked value when it is a per-token mean).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


class RngState:
    """CPU (and current CUDA device) RNG state, captured now, restorable later."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def _aux(model: Any) -> torch.Tensor | None:
    aux = model.aux_loss()
    if isinstance(aux, torch.Tensor) and aux.requires_grad:
        return aux
    return None


def _embed(model: Any, encode: Callable[[Any], torch.Tensor], items: Sequence[Any], autocast: Any) -> torch.Tensor:
    with autocast():
        return encode(model.collate(items)).float()


def forward_backward(
    model: Any,
    query_items: Sequence[Any],
    product_items: Sequence[Any],
    loss_fn: LossFn,
    *,
    chunk_size: int | None = None,
    aux_weight: float = 0.0,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    encode: Callable[[Any], torch.Tensor] | None = None,
    check_replay: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Embed queries and products, call ``loss_fn(q, p)`` and back-propagate into the model.

    Args:
        model: a TrainableEmbedder (``collate``, ``forward``, ``aux_loss``).
        query_items / product_items: inputs from ``build_query_inputs`` / ``build_product_inputs``.
        loss_fn: ``(q (n, d), p (m, d)) → (scalar to back-propagate, stats)``.
        chunk_size: items per forward pass; ``None`` or ≥ the batch means one pass per side.
        aux_weight: weight of the model's auxiliary loss (mean of the query and product sides).
        encode: the callable that embeds a collated batch (defaults to ``model``).
        check_replay: raise if a re-embedded chunk differs from its first pass (debugging).

    Returns:
        ``(q (n, d), p (m, d))`` detached vectors and the stats (with ``"aux"`` added).
    """
    encode = encode if encode is not None else model
    sides = (list(query_items), list(product_items))
    if chunk_size is None or all(len(s) <= chunk_size for s in sides):
        reps, auxes = [], []
        for items in sides:
            reps.append(_embed(model, encode, items, autocast))
            auxes.append(_aux(model))
        loss, stats = loss_fn(reps[0], reps[1])
        total = loss
        aux_terms = [a for a in auxes if a is not None]
        aux_value = sum(aux_terms) / 2 if aux_terms else None
        if aux_value is not None and aux_weight > 0:
            total = total + aux_weight * aux_value
        total.backward()
        stats["aux"] = float(aux_value.detach()) if aux_value is not None else 0.0
        return reps[0].detach(), reps[1].detach(), stats

    chunks = [[items[i : i + chunk_size] for i in range(0, len(items), chunk_size)] for items in sides]
    states: list[list[RngState]] = [[], []]
    cached: list[torch.Tensor] = []
    with torch.no_grad():
        for side, side_chunks in enumerate(chunks):
            parts = []
            for chunk in side_chunks:
                states[side].append(RngState())
                parts.append(_embed(model, encode, chunk, autocast))
            cached.append(torch.cat(parts).requires_grad_())
    after = RngState()
    loss, stats = loss_fn(cached[0], cached[1])
    loss.backward()
    aux_total = 0.0
    for side, side_chunks in enumerate(chunks):
        grad = cached[side].grad
        if grad is None:
            grad = torch.zeros_like(cached[side])
        n_side = len(sides[side])
        offset = 0
        for chunk, state in zip(side_chunks, states[side], strict=True):
            state.restore()
            rep = _embed(model, encode, chunk, autocast)
            if check_replay and not torch.allclose(
                rep.detach(), cached[side][offset : offset + len(chunk)].detach(), atol=1e-5
            ):
                raise RuntimeError("chunk re-embedding differs from its first pass (non-deterministic model?)")
            surrogate = (rep * grad[offset : offset + len(chunk)]).sum()
            aux = _aux(model)
            if aux is not None:
                weight = len(chunk) / n_side / 2
                aux_total += float(aux.detach()) * weight
                if aux_weight > 0:
                    surrogate = surrogate + aux_weight * weight * aux
            surrogate.backward()
            offset += len(chunk)
    after.restore()
    stats["aux"] = aux_total
    return cached[0].detach(), cached[1].detach(), stats
