"""The embedder protocol every model implements, and what ``moon train`` needs on top of it.

Anything with ``name``, ``dim``, ``fingerprint()``, ``encode_products`` and ``encode_queries`` can
be scored by the benchmark, indexed and served: MOON itself (:class:`moon.model.MoonEmbedder`) and
the baselines alike. A :class:`TrainableEmbedder` can also be trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moon.data.records import Product, Query


@runtime_checkable
class Embedder(Protocol):
    """What the harness, trainer, index and server need from a model.

    ``encode_products`` / ``encode_queries`` return float32 arrays of shape ``(n, dim)``, rows
    L2-normalised, in input order.
    """

    name: str
    dim: int

    def fingerprint(self) -> str:
        """A stable hash of weights + config: embeddings are cached under it."""
        ...

    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray: ...

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray: ...


class TrainableEmbedder(Embedder, Protocol):
    """An embedder that ``moon train`` can train (a ``torch.nn.Module``).

    The trainer never looks inside: it asks the model to turn records into CPU-side inputs,
    to collate them into a batch, and to embed a batch with gradients.

    * ``build_product_inputs(products)`` / ``build_query_inputs(queries)`` → one opaque input per
      record (tokenised text, pixel values …), on CPU, picklable for DataLoader workers;
    * ``collate(items)`` → one batch (items are all products or all queries);
    * ``forward(batch)`` → ``(B, dim)`` L2-normalised tensor on the module's device, with gradients;
    * ``aux_loss()`` → scalar tensor added to the loss (e.g. MoE load balancing of the last
      forward), zero when the model has none;
    * ``save_pretrained(dir)`` writes ``embedder.json`` (with ``"family"``) and safetensors weights,
      so that ``moon.load_embedder(dir)`` loads it back.
    """

    def build_product_inputs(self, products: Sequence[Product]) -> list[Any]: ...

    def build_query_inputs(self, queries: Sequence[Query]) -> list[Any]: ...

    def collate(self, items: Sequence[Any]) -> Any: ...

    def forward(self, batch: Any) -> Any: ...

    def aux_loss(self) -> Any: ...

    def save_pretrained(self, directory: str) -> None: ...


#: the methods :class:`TrainableEmbedder` adds to :class:`Embedder`
TRAINABLE_METHODS = ("build_product_inputs", "build_query_inputs", "collate", "forward", "aux_loss", "save_pretrained")


def missing_trainable_methods(model: Any) -> list[str]:
    """What ``model`` lacks to be trained: the missing :data:`TRAINABLE_METHODS`, and ``nn.Module``
    when it is not a ``torch.nn.Module``; empty when it can be trained."""
    import torch

    missing = [m for m in TRAINABLE_METHODS if not hasattr(model, m)]
    if not isinstance(model, torch.nn.Module):
        missing.append("nn.Module")
    return missing
