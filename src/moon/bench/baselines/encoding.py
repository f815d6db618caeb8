"""The batched no-grad encode loop shared by the torch baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from moon import progress
from moon.data.records import Product, Query


class BatchedEncoding:
    """Mixin for a TrainableEmbedder ``nn.Module``: ``encode_products`` / ``encode_queries`` via
    ``build_*_inputs`` → ``collate`` → ``forward`` in eval mode, batch by batch (training mode is
    restored afterwards)."""

    name: str
    dim: int

    def _encode(
        self, records: Sequence[Any], build: Callable, batch_size: int, show_progress: bool, what: str
    ) -> np.ndarray:
        was_training = self.training  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]
        out = np.zeros((len(records), self.dim), dtype=np.float32)
        try:
            with (
                torch.no_grad(),
                progress.bar(len(records), f"encode {what}", enabled=show_progress, unit=what) as bar,
            ):
                for start in range(0, len(records), batch_size):
                    chunk = records[start : start + batch_size]
                    out[start : start + len(chunk)] = self.forward(self.collate(build(chunk))).float().cpu().numpy()  # type: ignore[attr-defined]
                    bar.update(len(chunk))
        finally:
            self.train(was_training)  # type: ignore[attr-defined]
        return out

    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Products → ``(n, dim)`` float32 unit rows."""
        return self._encode(list(products), self.build_product_inputs, batch_size, show_progress, "products")  # type: ignore[attr-defined]

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Queries → ``(n, dim)`` float32 unit rows."""
        return self._encode(list(queries), self.build_query_inputs, batch_size, show_progress, "queries")  # type: ignore[attr-defined]
