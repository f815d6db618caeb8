"""The one encode loop of every torch embedder: records → model inputs → batches → vectors.

MOON (:class:`moon.model.MoonEmbedder`), the trainable baselines (:class:`TorchEncoding`) and the
trainer's validation all encode through :func:`encode_items`: eval mode (restored afterwards), no
gradients, the caller's autocast, optional length-sorted batches, float32 rows in input order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from moon import progress
from moon.data.records import Product, Query
from moon.errors import ConfigError

#: records are built (and, for MOON, their images' features computed) this many batches at a time
WINDOW_BATCHES = 16


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, its training mode restored after (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def encode_items(
    model: Any,
    items: Sequence[Any],
    *,
    batch_size: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    length: Callable[[Any], int] | None = None,
    bar: Any = None,
) -> np.ndarray:
    """``(len(items), model.dim)`` float32 rows of built inputs, through ``model.collate`` and
    ``model.forward`` in batches of ``batch_size``; with ``length``, items of similar length are
    batched together (less padding), the rows still come back in input order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    out = np.zeros((len(items), int(model.dim)), dtype=np.float32)
    order = sorted(range(len(items)), key=lambda i: length(items[i])) if length else list(range(len(items)))
    with eval_mode(model), torch.no_grad(), autocast():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            vecs = model(model.collate([items[i] for i in idx]))
            out[idx] = vecs.float().cpu().numpy()
            if bar is not None:
                bar.update(len(idx))
    return out


def encode_records(
    model: Any,
    records: Sequence[Any],
    build: Callable[[Sequence[Any]], list[Any]],
    *,
    batch_size: int,
    show_progress: bool = False,
    what: str = "records",
    prefetch: Callable[[Sequence[Any]], None] | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    length: Callable[[Any], int] | None = None,
) -> np.ndarray:
    """``(len(records), model.dim)`` float32 rows: ``records`` are built ``batch_size`` ×
    :data:`WINDOW_BATCHES` at a time (``prefetch(window)`` first, e.g. image features in full
    batches), then encoded with :func:`encode_items`, all in eval mode without gradients; a progress
    bar when ``show_progress``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    records = list(records)
    out = np.zeros((len(records), int(model.dim)), dtype=np.float32)
    window = batch_size * WINDOW_BATCHES
    # building (and prefetching image features) in eval mode too: a frozen encoder's BatchNorm
    # must not see a model left in training mode
    with (
        eval_mode(model),
        torch.no_grad(),
        progress.bar(len(records), f"encode {what}", enabled=show_progress, unit=what) as bar,
    ):
        for start in range(0, len(records), window):
            chunk = records[start : start + window]
            if prefetch is not None:
                prefetch(chunk)
            items = build(chunk)
            out[start : start + len(chunk)] = encode_items(
                model, items, batch_size=batch_size, autocast=autocast, length=length, bar=bar
            )
    return out


class TorchEncoding:
    """Mixin for a trainable ``nn.Module`` embedder: ``encode_products`` / ``encode_queries`` through
    its own ``build_*_inputs`` → ``collate`` → ``forward`` (:func:`encode_records`)."""

    name: str
    dim: int

    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Products → ``(n, dim)`` float32 unit rows."""
        return encode_records(self, products, self.build_product_inputs, batch_size=batch_size,  # type: ignore[attr-defined]
                              show_progress=show_progress, what="products")  # fmt: skip

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Queries → ``(n, dim)`` float32 unit rows."""
        return encode_records(self, queries, self.build_query_inputs, batch_size=batch_size,  # type: ignore[attr-defined]
                              show_progress=show_progress, what="queries")  # fmt: skip
