"""The batched no-grad encode loop shared by the torch baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moon.data.records import Product, Query


class BatchedEncoding:
    """Mixin for a TrainableEmbedder ``nn.Module``: ``encode_products`` / ``encode_queries`` via
    ``build_*_inputs`` → ``collate`` → ``forward`` in eval mode, batch by batch (training mode is
    restored afterwards)."""

    name: str
    dim: int

    def _encode(self, records: Sequence[Any], build: Callable, batch_size: int, show_progress: bool) -> np.ndarray:
        was_training = self.training  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]
        out = np.zeros((len(records), self.dim), dtype=np.float32)
        try:
            with torch.no_grad():
                for start in tqdm(
                    range(0, len(records), batch_size), disable=not show_progress, desc=self.name, unit="batch"
                ):
                    chunk = records[start : start + batch_size]
                    out[start : start + len(chunk)] = self.forward(self.collate(build(chunk))).float().cpu().numpy()  # type: ignore[attr-defined]
        finally:
            self.train(was_training)  # type: ignore[attr-defined]
        return out

    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Products → ``(n, dim)`` float32 unit rows."""
        return self._encode(list(products), self.build_product_inputs, batch_size, show_progress)  # type: ignore[attr-defined]

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Queries → ``(n, dim)`` float32 unit rows."""
        return self._encode(list(queries), self.build_query_inputs, batch_size, show_progress)  # type: ignore[attr-defined]
