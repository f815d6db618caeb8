"""A tiny deterministic TrainableEmbedder for the trainer's tests (hashed words → bag → linear)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moon.data import Product, Query, product_text

BUCKETS = 257


def _tokens(text: str) -> list[int]:
    words = text.lower().split() or ["<empty>"]
    return [zlib.crc32(w.encode()) % BUCKETS for w in words]


class ToyEmbedder(nn.Module):
    """Text-only toy: image queries are embedded from their image file names."""

    name = "toy"

    def __init__(self, dim: int = 8, hidden: int = 16, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "dropout": dropout, "seed": seed}
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)
        self.tok = nn.Embedding(BUCKETS, hidden)
        self.proj = nn.Linear(hidden, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.drop = nn.Dropout(dropout)
        self._aux = torch.zeros(())

    def build_product_inputs(self, products: Sequence[Product]) -> list[Any]:
        return [_tokens(product_text(p)) for p in products]

    def build_query_inputs(self, queries: Sequence[Query]) -> list[Any]:
        return [_tokens((q.text or "") + " " + " ".join(Path(str(i)).stem for i in q.images)) for q in queries]

    def collate(self, items: Sequence[Any]) -> Any:
        width = max(len(t) for t in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width)
        for i, t in enumerate(items):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        return {"ids": ids, "mask": mask}

    def forward(self, batch: Any) -> torch.Tensor:
        dev = self.proj.weight.device
        ids, mask = batch["ids"].to(dev), batch["mask"].to(dev)
        h = (self.tok(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out = self.proj(self.drop(torch.tanh(h)))
        self._aux = (out**2).mean()  # a per-item mean: chunking must not change it
        return F.normalize(out, dim=-1)

    def aux_loss(self) -> torch.Tensor:
        return self._aux

    def _encode(self, items: list[Any], batch_size: int) -> np.ndarray:
        outs = []
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                outs.append(self.forward(self.collate(items[i : i + batch_size])).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)

    def encode_products(self, products, *, batch_size: int = 16, show_progress: bool = False) -> np.ndarray:
        return self._encode(self.build_product_inputs(products), batch_size)

    def encode_queries(self, queries, *, batch_size: int = 16, show_progress: bool = False) -> np.ndarray:
        return self._encode(self.build_query_inputs(queries), batch_size)

    def fingerprint(self) -> str:
        return "toy"

    def save_pretrained(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "embedder.json").write_text(json.dumps({"family": "toy", **self.config}))
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(d / "toy.safetensors"))


def make_toy(**overrides: Any) -> ToyEmbedder:
    return ToyEmbedder(**overrides)
