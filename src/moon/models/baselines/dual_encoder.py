"""The ``dual-encoder`` baseline: a CLIP-style two-tower model trained from scratch.

Image tower: a ViT (patch embedding, [CLS], learned positions, pre-norm transformer) on square
``image_size`` images; text tower: a transformer over UTF-8 bytes (:mod:`byte_tokenizer`) with
masked mean pooling. Each tower ends in a linear projection to ``dim`` and L2 normalisation.

A record's vector fuses its sides (PAPER.md §1's "discriminative dual-flow" family): every image
(and crop, when ``use_crops``) is embedded separately, the image vectors are averaged and mixed with
the text vector, ``normalize(w · mean(images) + (1 − w) · text)``. Product text is the template of
:func:`moon.data.product_text` (parts that are empty are omitted — e.g. in classification tasks).

Default size (``DualEncoderConfig()``): 2 × 4 layers × 192 hidden; about 3.6 M non-embedding
parameters (see :meth:`DualEncoder.parameter_counts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moon.data.records import Product, Query, product_text
from moon.models.baselines.byte_tokenizer import VOCAB_SIZE, encode_text, pad_batch
from moon.models.baselines.fusion import fuse
from moon.models.baselines.persistence import SavedConfigModule, tensors_fingerprint
from moon.models.baselines.pixels import images_tensor
from moon.models.encoding import TorchEncoding

FAMILY = "dual-encoder"


@dataclass
class DualEncoderConfig:
    """Shape of the two towers (both share ``hidden``/``layers``/``heads``)."""

    dim: int = 256
    hidden: int = 192
    layers: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    image_size: int = 112
    patch: int = 16
    max_text_len: int = 96
    max_images: int = 4
    use_crops: bool = True
    image_weight: float = 0.5
    dropout: float = 0.0
    seed: int = 0


def _encoder(cfg: DualEncoderConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        cfg.hidden,
        cfg.heads,
        int(cfg.hidden * cfg.mlp_ratio),
        cfg.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)


class ImageTower(nn.Module):
    """``(N, 3, S, S)`` pixels → ``(N, dim)`` unit vectors ([CLS] token of a ViT)."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        n_patches = (cfg.image_size // cfg.patch) ** 2
        self.patchify = nn.Conv2d(3, cfg.hidden, cfg.patch, cfg.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, cfg.hidden) * 0.02)
        self.encoder = _encoder(cfg)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patchify(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        x = self.norm(self.encoder(x))
        return nn.functional.normalize(self.proj(x[:, 0]), dim=-1)


class TextTower(nn.Module):
    """``(B, L)`` byte ids + mask → ``(B, dim)`` unit vectors (masked mean of the last layer)."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.hidden)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_text_len, cfg.hidden) * 0.02)
        self.encoder = _encoder(cfg)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
        return nn.functional.normalize(self.proj(pooled), dim=-1)


class DualEncoder(SavedConfigModule, TorchEncoding, nn.Module):
    """CLIP-style two towers behind the :class:`moon.models.TrainableEmbedder` protocol."""

    family = FAMILY
    config_class = DualEncoderConfig

    def __init__(self, config: DualEncoderConfig | None = None, *, name: str = FAMILY):
        super().__init__()
        self.config = config or DualEncoderConfig()
        self.name = name
        self.dim = self.config.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.image_tower = ImageTower(self.config)
            self.text_tower = TextTower(self.config)

    # ------------------------------------------------------------------ inputs
    def _images(self, images: Sequence[Any], crops: Sequence[Any]) -> torch.Tensor:
        refs = list(images) + ([c for c in crops if c is not None] if self.config.use_crops else [])
        return images_tensor(refs[: self.config.max_images], self.config.image_size)

    def build_product_inputs(self, products: Sequence[Product]) -> list[dict[str, Any]]:
        """One dict per product: ``pixels`` ``(n, 3, S, S)``, ``ids`` ``(L,)``, ``has_text``."""
        return [
            {
                "pixels": self._images(p.images, p.crops),
                "ids": encode_text(product_text(p), self.config.max_text_len),
                "has_text": True,
            }
            for p in products
        ]

    def build_query_inputs(self, queries: Sequence[Query]) -> list[dict[str, Any]]:
        """One dict per query (text may be absent: then only the images count)."""
        out = []
        for q in queries:
            text = (q.text or "").strip()
            out.append(
                {
                    "pixels": self._images(q.images, q.crops),
                    "ids": encode_text(text, self.config.max_text_len),
                    "has_text": bool(text),
                }
            )
        return out

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Items → ``pixels (N, 3, S, S)``, ``owner (N,)``, ``ids``/``mask (B, L)``, ``has_text (B,)``."""
        size = self.config.image_size
        pixels = [it["pixels"] for it in items]
        owner = (
            torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(pixels)])
            if items
            else torch.zeros(0, dtype=torch.long)
        )
        ids, mask = pad_batch([it["ids"] for it in items])
        return {
            "pixels": torch.cat(pixels) if pixels else torch.zeros((0, 3, size, size)),
            "owner": owner,
            "ids": ids,
            "mask": mask,
            "has_text": torch.tensor([bool(it["has_text"]) for it in items], dtype=torch.bool),
        }

    # ------------------------------------------------------------------ model
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A collated batch → ``(B, dim)`` L2-normalised vectors (with gradients)."""
        dev = self.device
        batch = {k: v.to(dev) for k, v in batch.items()}
        text = self.text_tower(batch["ids"], batch["mask"])
        if len(batch["pixels"]):
            images = self.image_tower(batch["pixels"])
        else:
            images = text.new_zeros((0, self.dim))
        return fuse(images, batch["owner"], text, batch["has_text"], self.config.image_weight)

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per tower, with and without the token embedding table."""
        img = sum(p.numel() for p in self.image_tower.parameters())
        txt = sum(p.numel() for p in self.text_tower.parameters())
        emb = self.text_tower.embed.weight.numel()
        return {"image_tower": img, "text_tower": txt, "total": img + txt, "non_embedding": img + txt - emb}

    # ------------------------------------------------------------------ persistence
    def fingerprint(self) -> str:
        return tensors_fingerprint(self.config, self.state_dict())


def load_dual_encoder(arg: str | None = None, **overrides: Any) -> DualEncoder:
    """``dual-encoder`` (fresh, seeded) or ``dual-encoder:DIR`` / ``DIR`` (saved by ``save_pretrained``)."""
    return DualEncoder.load(arg, **overrides)
