"""The ``two-tower`` baseline: a CLIP-style two-tower model built from **the same pretrained parts as
a MOON graft preset** (an equal start).

* image tower: the preset's frozen image encoder (EfficientNet-Lite0 for ``moon-smol``), its feature
  map average-pooled to one vector, then a trainable MLP (LayerNorm → Linear → GELU → Linear) into the
  LM's width;
* text tower: the preset's causal LM (same kept layers, same tokenizer, same instruction prefixes),
  masked mean of its last hidden states — exactly MOON's pooling, on text alone;
* a record's vector: ``normalize(w · mean(normalize(images)) + (1 − w) · normalize(text))``, the late
  fusion of :mod:`moon.models.baselines.fusion`.

So the only difference from MOON is the architecture the paper argues about: images and text are
encoded apart and fused late, instead of one sequence through one LM (and no MoE). It trains with the
same trainer, data, steps and batch; ``model.freeze_lower_layers`` freezes the same LM layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moon.data.records import Product, Query, product_text
from moon.errors import ConfigError
from moon.models.baselines.fusion import fuse
from moon.models.baselines.persistence import config_with_overrides, read_saved_config, save_module, tensors_fingerprint
from moon.models.encoding import TorchEncoding

FAMILY = "two-tower"
LM_DIR = "lm"
PROCESSOR_DIR = "processor"


@dataclass
class TwoTowerConfig:
    """``parts``: the MOON preset whose pretrained parts both towers start from; ``graft``: overrides of
    that preset's graft fields (``{"keep_layers": 8}`` …)."""

    parts: str = "moon-smol"
    graft: dict[str, Any] = field(default_factory=dict)
    max_images: int = 3
    use_crops: bool = True
    image_weight: float = 0.5
    max_text_tokens: int = 128
    product_instruction: str = "Represent this product for retrieval.\n"
    query_instruction: str = "Find the product for this query.\n"
    seed: int = 0

    def graft_config(self):
        from moon.model.config import PRESETS, GraftConfig

        preset = PRESETS.get(self.parts)
        if preset is None or "graft" not in preset.overrides:
            graft_presets = [n for n, p in PRESETS.items() if "graft" in p.overrides]
            raise ConfigError(f"two-tower parts={self.parts!r}: not a graft preset ({', '.join(graft_presets)})")
        spec = {**preset.overrides["graft"], **self.graft, "image_tokens": 1}
        return GraftConfig.from_dict(spec)


class TwoTower(TorchEncoding, nn.Module):
    """Frozen image encoder + MLP, and a pretrained causal LM, fused late (a ``TrainableEmbedder``)."""

    def __init__(self, config: TwoTowerConfig | None = None, *, name: str = FAMILY, lm: nn.Module | None = None,
                 tokenizer: Any = None):  # fmt: skip
        super().__init__()
        from moon.model.graft import FrozenImageFeatures, load_lm, load_tokenizer_for
        from moon.model.image_encoders import build_image_encoder

        self.config = config or TwoTowerConfig()
        self.name = name
        spec = self.config.graft_config()
        self.spec = spec
        self.lm = lm if lm is not None else load_lm(spec, seed=self.config.seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer_for(spec)
        hidden = int(self.lm.config.hidden_size)
        self.dim = hidden
        with torch.random.fork_rng(devices=[]):
            # a random encoder (tiny-cnn) is seeded as build_graft seeds it: it is not saved, so a
            # reloaded two-tower must rebuild the same one (else its fingerprint and vectors change)
            torch.manual_seed(self.config.seed + 7)
            encoder = build_image_encoder(spec.image_encoder, image_size=spec.image_size, pretrained=True)
        encoder.requires_grad_(False).eval()
        object.__setattr__(self, "_encoder", encoder)  # frozen, from the asset: not saved, not trained
        self.features = FrozenImageFeatures(encoder, 1, spec.feature_cache)
        d = encoder.feature_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 7)
            self.image_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # MOON's centring, on the text tower (see MoonConfig.center): set by calibrate()
        self.register_buffer("text_center", torch.zeros(hidden))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.end_id = int(self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad_id)

    # ------------------------------------------------------------------ inputs
    def _ids(self, instruction: str, text: str) -> torch.Tensor:
        tok = self.tokenizer
        prefix = tok(instruction, add_special_tokens=False)["input_ids"] if instruction else []
        body = tok(text, add_special_tokens=False)["input_ids"][: self.config.max_text_tokens] if text else []
        return torch.tensor(prefix + body + [self.end_id], dtype=torch.long)

    def _refs(self, images: Sequence[Any], crops: Sequence[Any]) -> list[Any]:
        kept = list(images[: self.config.max_images])
        refs = []
        for i, ref in enumerate(kept):
            refs.append(ref)
            if self.config.use_crops and i < len(crops) and crops[i] is not None:
                refs.append(crops[i])
        return refs

    def _item(self, instruction: str, text: str, refs: list[Any]) -> dict[str, Any]:
        return {"ids": self._ids(instruction, text), "image_feats": self.features(refs), "has_text": bool(text)}

    def build_product_inputs(self, products: Sequence[Product]) -> list[dict[str, Any]]:
        """One dict per product: ``ids (L,)`` (instruction + product text), ``image_feats (n, D)``."""
        c = self.config
        return [self._item(c.product_instruction, product_text(p), self._refs(p.images, p.crops)) for p in products]

    def build_query_inputs(self, queries: Sequence[Query]) -> list[dict[str, Any]]:
        c = self.config
        return [self._item(c.query_instruction, (q.text or "").strip(), self._refs(q.images, q.crops)) for q in queries]

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max((len(it["ids"]) for it in items), default=1)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, : len(it["ids"])] = it["ids"]
            mask[i, : len(it["ids"])] = 1
        feats = [it["image_feats"] for it in items]
        return {
            "ids": ids,
            "mask": mask,
            "image_feats": torch.cat(feats) if feats else torch.zeros((0, self.image_head[0].normalized_shape[0])),
            "owner": torch.cat([torch.full((len(f),), i, dtype=torch.long) for i, f in enumerate(feats)])
            if feats
            else torch.zeros(0, dtype=torch.long),
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
        text = nn.functional.normalize(self._text_pooled(batch) - self.text_center, dim=-1)
        images = nn.functional.normalize(self.image_head(batch["image_feats"]).float(), dim=-1)
        return fuse(images, batch["owner"], text, batch["has_text"], self.config.image_weight)

    def _text_pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from moon.model.pooling import pool

        hidden = self.lm(input_ids=batch["ids"], attention_mask=batch["mask"], use_cache=False).last_hidden_state
        return pool(hidden, batch["mask"], "mean").float()

    @torch.no_grad()
    def calibrate(self, products: Sequence[Product], queries: Sequence[Query] = (), *, batch_size: int = 16) -> None:
        """Set the text centre to the mean pooled text vector of ``products`` and ``queries`` (each side
        half), exactly as :meth:`moon.model.MoonEmbedder.calibrate` does for MOON."""
        was_training = self.training
        self.eval()
        means = []
        try:
            for items in (self.build_product_inputs(products), self.build_query_inputs(queries)):
                if not items:
                    continue
                total = torch.zeros_like(self.text_center)
                for start in range(0, len(items), batch_size):
                    batch = {k: v.to(self.device) for k, v in self.collate(items[start : start + batch_size]).items()}
                    total += self._text_pooled(batch).sum(0)
                means.append(total / len(items))
        finally:
            self.train(was_training)
        if means:
            self.text_center.copy_(torch.stack(means).mean(0))

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def freeze_vision(self) -> None:
        """The image encoder is always frozen; this freezes the image head too."""
        self.image_head.requires_grad_(False)

    def freeze_lower_layers(self, n: int) -> None:
        """No gradient into the token embeddings and the first ``n`` LM layers (as for MOON)."""
        if not 0 <= n <= len(self.lm.layers):
            raise ConfigError(f"freeze_lower_layers={n}: the LM has {len(self.lm.layers)} layers")
        if n:
            self.lm.get_input_embeddings().requires_grad_(False)
            for layer in self.lm.layers[:n]:
                layer.requires_grad_(False)

    def gradient_checkpointing_enable(self) -> None:
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ persistence
    def fingerprint(self) -> str:
        return tensors_fingerprint(self.config, {f"encoder:{self.features.key()}": torch.zeros(1), **self.state_dict()})

    def save_pretrained(self, directory: str) -> None:
        """``embedder.json``, ``model.safetensors`` (LM + image head), ``lm/`` config, ``processor/``
        tokenizer; the frozen image encoder comes from its asset."""
        save_module(self, directory, FAMILY, self.config, self.state_dict())
        self.lm.config.save_pretrained(str(Path(directory) / LM_DIR))
        self.tokenizer.save_pretrained(str(Path(directory) / PROCESSOR_DIR))

    @classmethod
    def from_pretrained(cls, directory: str, **overrides: Any) -> TwoTower:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from moon.model.processors import qwen2_tokenizer

        raw, tensors = read_saved_config(directory, FAMILY)
        config = config_with_overrides(TwoTowerConfig, raw, overrides)
        d = Path(directory)
        try:
            lm_config = AutoConfig.from_pretrained(str(d / LM_DIR))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{d}: {LM_DIR}/config.json is missing or unreadable ({exc})") from exc
        lm_config._attn_implementation = "sdpa"
        lm = AutoModel.from_config(lm_config)
        spec = config.graft_config()
        tok = (
            qwen2_tokenizer()
            if spec.tokenizer == "qwen2-offline"
            else AutoTokenizer.from_pretrained(str(d / PROCESSOR_DIR))
        )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = cls(config, name=f"{FAMILY}:{directory}", lm=lm, tokenizer=tok)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as exc:
            raise ConfigError(f"{d}: weights do not match the saved two-tower ({str(exc)[:300]})") from exc
        return model.float()


def load_two_tower(arg: str | None = None, **overrides: Any) -> TwoTower:
    """``two-tower`` (moon-smol's parts), ``two-tower:PRESET`` (another graft preset's parts) or
    ``two-tower:DIR`` / ``DIR`` (saved)."""
    if arg and Path(arg).is_dir():
        return TwoTower.from_pretrained(arg, **overrides)
    if arg:
        overrides = {"parts": arg, **overrides}
    return TwoTower(config_with_overrides(TwoTowerConfig, None, overrides))


__all__ = ["TwoTower", "TwoTowerConfig", "load_two_tower"]
