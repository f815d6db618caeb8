"""Adapters for external checkpoints users may have: open_clip / SigLIP and GME-Qwen2-VL.

Neither can run in this project's reference environment (open_clip pulls torchvision, which does not
import beside torch 2.13; no GME weights are reachable offline), so both check their requirements
first and fail with a :class:`~moon.errors.ConfigError` saying what to install or point to. They are
written against the public APIs of those projects but are untested here.

* ``open-clip:ARCH`` or ``open-clip:ARCH@PRETRAINED`` (``PRETRAINED`` = a tag or a local checkpoint file),
  e.g. ``open-clip:ViT-B-32@/models/clip.bin`` or ``open-clip:ViT-B-16-SigLIP@webli``;
* ``gme:DIR`` — a local GME-Qwen2-VL directory; its ``gme_inference`` API (``get_text_embeddings`` /
  ``get_image_embeddings`` / ``get_fused_embeddings``) is Python code shipped *inside the checkpoint*,
  so loading it runs that code: only when ``trust_remote_code`` is true, which the CLI sets for an
  explicit ``--trust-remote-code`` flag and never for a spec read from a data file (an index
  manifest, a saved ``embedder.json``).

Products are fused as in the dual encoder: the mean of the image vectors mixed with the text vector.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moon.data.images import load_image
from moon.data.records import Product, Query, product_text
from moon.errors import ConfigError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _fuse(image_vecs: list[np.ndarray], text_vec: np.ndarray | None, weight: float = 0.5) -> np.ndarray:
    if image_vecs and text_vec is not None:
        return _unit(weight * np.mean(image_vecs, axis=0) + (1 - weight) * text_vec)
    if image_vecs:
        return _unit(np.mean(image_vecs, axis=0))
    return _unit(text_vec) if text_vec is not None else np.zeros(0, np.float32)


class _PerRecordEmbedder:
    """Encodes one record at a time through ``_embed(text, images) -> (dim,)`` (the adapters' models
    take one image per call); products use the full text template."""

    def _embed(self, text: str | None, images: Sequence[Any]) -> np.ndarray:
        raise NotImplementedError

    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        return np.stack([self._embed(product_text(p), p.images) for p in products]).astype(np.float32)

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        return np.stack([self._embed(q.text, q.images) for q in queries]).astype(np.float32)


class OpenClipEmbedder(_PerRecordEmbedder):
    """An open_clip model (CLIP, SigLIP …) scored through the harness (frozen; not trainable here)."""

    def __init__(self, arch: str, pretrained: str | None):
        if importlib.util.find_spec("open_clip") is None:
            raise ConfigError(
                "open-clip: the open_clip package is not installed. It needs torchvision, which does not import "
                "beside torch 2.13 in this environment; use a separate environment with `pip install open_clip_torch` "
                "(e.g. torch==2.14.1 torchvision==0.29.1) and run `moon eval --model open-clip:ARCH@PRETRAINED` there."
            )
        import open_clip
        import torch

        self._torch = torch
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = f"open-clip:{arch}" + (f"@{pretrained}" if pretrained else "")
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[-1])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def _embed(self, text: str | None, images: Sequence[Any]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            img = [self.model.encode_image(self.preprocess(load_image(r)).unsqueeze(0))[0].numpy() for r in images]
            txt = self.model.encode_text(self.tokenizer([text]))[0].numpy() if text else None
        return _fuse([_unit(v) for v in img], _unit(txt) if txt is not None else None)


def load_open_clip(arg: str | None = None, **overrides: Any) -> OpenClipEmbedder:
    if not arg:
        raise ConfigError(
            "open-clip needs a model: open-clip:ARCH or open-clip:ARCH@PRETRAINED (tag or checkpoint file)"
        )
    arch, _, pretrained = arg.partition("@")
    return OpenClipEmbedder(arch, pretrained or None)


class GmeEmbedder(_PerRecordEmbedder):
    """A GME-Qwen2-VL checkpoint (frozen) through its remote-code inference API."""

    def __init__(self, path: str, *, trust_remote_code: bool = False):
        p = Path(path)
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ConfigError(
                f"gme:{path}: not a local GME-Qwen2-VL checkpoint directory (no config.json). Download "
                "Alibaba-NLP/gme-Qwen2-VL-2B-Instruct on a machine with hub access and pass its directory; "
                "nothing is downloaded at run time."
            )
        if trust_remote_code is not True:
            raise ConfigError(
                f"gme:{path}: a GME checkpoint runs its own Python code (trust_remote_code); read {p} first, "
                "then pass --trust-remote-code (or trust_remote_code as true) if you trust it"
            )
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(
            str(p),
            trust_remote_code=trust_remote_code,  # True only on the user's explicit flag (checked above)
            local_files_only=True,
        ).eval()
        for method in ("get_text_embeddings", "get_image_embeddings", "get_fused_embeddings"):
            if not hasattr(self.model, method):
                raise ConfigError(
                    f"gme:{path}: the model has no {method}(); is this a GME checkpoint with its gme_inference code?"
                )
        self.name = f"gme:{path}"
        self._path = str(p.resolve())
        self.dim = int(getattr(self.model.config, "hidden_size", 0) or 1536)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._path.encode()).hexdigest()[:16]

    def _embed(self, text: str | None, images: Sequence[Any]) -> np.ndarray:
        pil = [load_image(r) for r in images]
        img = [np.asarray(self.model.get_image_embeddings(images=[im]))[0] for im in pil]
        txt = np.asarray(self.model.get_text_embeddings(texts=[text]))[0] if text else None
        return _fuse([_unit(v) for v in img], _unit(txt) if txt is not None else None)


def load_gme(arg: str | None = None, *, trust_remote_code: bool = False, **overrides: Any) -> GmeEmbedder:
    """``gme:DIR``; refused unless ``trust_remote_code`` (see the module docstring)."""
    if not arg:
        raise ConfigError("gme needs a local checkpoint directory: gme:/path/to/gme-Qwen2-VL-2B-Instruct")
    return GmeEmbedder(arg, trust_remote_code=trust_remote_code)
