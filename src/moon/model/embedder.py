"""The MOON embedder: one multimodal backbone that embeds whole products and queries.

``MoonEmbedder.from_pretrained(name_or_path)`` accepts a preset name (``moon-smol``, ``moon-tiny``
…, see :data:`moon.model.PRESETS`), a directory written by :meth:`MoonEmbedder.save_pretrained`, a
transformers Qwen-VL checkpoint directory or hub id, or any other causal LM directory / hub id
(grafted onto an image encoder, see :mod:`moon.model.graft`). Everything that depends on the kind
of backbone lives in its :class:`~moon.model.family.BackboneFamily`. Importing this module registers the
``moon`` family with :func:`moon.models.load_embedder`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moon.data import Product, Query
from moon.errors import ConfigError
from moon.model.backbone import SUPPORTED as SUPPORTED_QWEN
from moon.model.backbone import (
    backbone_config_from_dict,
    build_backbone,
    checkpoint_model_type,
    load_backbone,
    preset_backbone_config,
)
from moon.model.config import ASPECTS, EXPERTS, PRESETS, MoonConfig
from moon.model.family import PROCESSOR_DIR, QWEN_VL, BackboneFamily, family_for
from moon.model.inputs import EncodedInput, collate
from moon.model.moe import RoutingState, aux_loss, checkpoint_context_fn, moe_layers, upcycle
from moon.model.pooling import pool
from moon.model.processors import load_tokenizer, qwen2_tokenizer
from moon.models.saved import EMBEDDER_FILE, WEIGHTS_FILE, has_embedder_file, read_saved_meta, read_weights, write_saved

FORMAT_VERSION = 2  # 2: the graft family (a "family" key); version-1 directories are Qwen-VL and still load
_STRUCTURAL = ("moe_mode", "moe_layers", "moe_top_k", "projection_dim", "graft", "center")
DEFAULT_LORA_TARGETS = QWEN_VL.lora_targets


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MoonEmbedder(nn.Module):
    """Product/query embedder over a Qwen-VL or graft backbone (implements ``TrainableEmbedder``).

    ``encode_products`` / ``encode_queries`` return float32 ``(n, dim)`` arrays, L2-normalised.
    """

    def __init__(self, config: MoonConfig, backbone: nn.Module, tokenizer, *, name: str | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.name = name or config.backbone
        self.family: BackboneFamily = family_for(config)
        self.routing = RoutingState()
        self.inputs = self.family.input_builder(config, tokenizer, backbone)
        self._packable = self.family.install_packing(backbone)
        hidden = self.family.hidden_size(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.moe_layer_ids: list[int] = []
            if config.moe_mode != "dense":
                self.upcycle()
            self.projection = (
                nn.Linear(hidden, config.projection_dim, bias=False).to(next(backbone.parameters()).device)
                if config.projection_dim
                else None
            )
        if config.center:
            self.register_buffer("center", torch.zeros(hidden, device=next(backbone.parameters()).device))
        out = config.projection_dim or hidden
        self.dim = min(config.matryoshka_dim, out) if config.matryoshka_dim else out
        self._lora = False

    # -- construction -----------------------------------------------------------------------
    def upcycle(self) -> list[int]:
        """Turn the chosen decoder MLPs into guided MoE layers (no-op for ``moe_mode="dense"``)."""
        c = self.config
        if c.moe_mode == "dense":
            return []
        self.moe_layer_ids = upcycle(
            self.family.text_model(self.backbone),
            self.routing,
            layers=c.moe_layers,
            mode=c.moe_mode,
            top_k=c.moe_top_k,
            guidance_init=c.moe_guidance_init,
            guidance_scale=c.moe_guidance_scale,
        )
        return self.moe_layer_ids

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **overrides: Any,
    ) -> MoonEmbedder:
        """Load a preset, a saved MOON directory, a Qwen-VL checkpoint directory or hub id, or a
        causal LM directory or hub id (grafted onto ``graft.image_encoder``).

        ``overrides`` are :class:`MoonConfig` fields (``moe_mode="dense"``, ``pooling="last"``,
        ``graft={"keep_layers": 8}`` …). ``device`` defaults to CUDA when available; ``dtype`` to bf16
        on CUDA, float32 on CPU. ``device="meta"`` builds a Qwen-VL preset's structure without
        allocating weights.
        """
        name_or_path = str(name_or_path)
        dev = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        path = Path(name_or_path)
        if has_embedder_file(path):
            emb = cls._load_saved(path, overrides)
        elif name_or_path in PRESETS:
            preset = PRESETS[name_or_path]
            config = MoonConfig(backbone=name_or_path).replace(**preset.overrides).replace(**overrides)
            emb = cls._build(config, name_or_path, dev)
        else:
            graft = overrides.get("graft")
            if isinstance(graft, dict) and "lm" not in graft:  # graft fields given: the LM is this path
                overrides = {**overrides, "graft": {**graft, "lm": name_or_path}}
            config = MoonConfig(backbone=name_or_path).replace(**overrides)
            if config.graft is None and checkpoint_model_type(name_or_path) not in SUPPORTED_QWEN:
                config = config.replace(graft={"lm": name_or_path})  # any other causal LM: graft it
            if config.graft is not None:
                emb = cls._build(config, name_or_path, dev)
            else:
                backbone = load_backbone(name_or_path, dtype=dtype)
                emb = cls(config, backbone, load_tokenizer(name_or_path), name=name_or_path)
        if dev.type != "meta":
            emb.to(device=dev, dtype=dtype)
        return emb.eval()

    @classmethod
    def _build(cls, config: MoonConfig, name: str, dev: torch.device) -> MoonEmbedder:
        """A fresh embedder from a config: a seeded random Qwen-VL preset, or a graft of pretrained parts."""
        if config.graft is not None:
            from moon.model.graft import build_graft, load_tokenizer_for

            return cls(config, build_graft(config.graft, seed=config.seed), load_tokenizer_for(config.graft), name=name)
        backbone = build_backbone(preset_backbone_config(config.backbone), seed=config.seed, device=dev)
        return cls(config, backbone, qwen2_tokenizer(), name=name)

    @classmethod
    def _load_saved(cls, path: Path, overrides: dict[str, Any]) -> MoonEmbedder:
        meta = read_saved_meta(path, "moon")  # (the weights are read once the architecture is built)
        if not isinstance(meta.get("config"), dict):
            raise ConfigError(f"{path / EMBEDDER_FILE}: no 'config' mapping")
        saved = MoonConfig.from_dict(meta["config"])
        config = saved.replace(**overrides)
        changed = [k for k in _STRUCTURAL if getattr(config, k) != getattr(saved, k)]
        upcycle_after = (
            bool(changed) and saved.moe_mode == "dense" and set(changed) <= {"moe_mode", "moe_layers", "moe_top_k"}
        )
        if changed and not upcycle_after:
            raise ConfigError(
                f"{path}: cannot override {', '.join(changed)} of a saved model (only dense → MoE upcycling is possible)"
            )
        family = family_for(saved)
        backbone = family.build_saved(path, saved)
        if meta.get("tokenizer") == "qwen2-offline":
            tokenizer = qwen2_tokenizer()
        elif saved.graft is not None:
            from moon.model.graft import load_tokenizer_for

            tokenizer = load_tokenizer_for(saved.graft, saved=path / PROCESSOR_DIR)
        else:
            tokenizer = load_tokenizer(path / PROCESSOR_DIR)
        emb = cls(saved, backbone, tokenizer, name=meta.get("name"))
        weights = path / WEIGHTS_FILE
        state = read_weights(path)
        try:
            emb.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"{weights}: does not match the saved architecture ({str(exc)[:300]})") from exc
        if upcycle_after or config != saved:
            emb.config = config
            emb.inputs = emb.family.input_builder(config, tokenizer, emb.backbone)
            if upcycle_after:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(config.seed + 1)
                    emb.upcycle()
            pooled = config.projection_dim or emb.family.hidden_size(emb.backbone)
            emb.dim = min(config.matryoshka_dim, pooled) if config.matryoshka_dim else pooled
        return emb

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``embedder.json``, ``model.safetensors`` (LoRA merged), the backbone config and the
        tokenizer/image processor, so that ``from_pretrained(directory)`` works offline."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.family.save_backbone(self, out)
        self.tokenizer.save_pretrained(str(out / PROCESSOR_DIR))
        meta = {
            "family": "moon",
            "format_version": FORMAT_VERSION,
            "backbone_family": self.family.name,
            "name": self.name,
            "dim": self.dim,
            "moe_layers": self.moe_layer_ids,
            # the offline Qwen2 tokenizer is rebuilt from its cache on load (the files are saved too)
            "tokenizer": "qwen2-offline" if self.tokenizer is qwen2_tokenizer() else "saved",
            "config": self.config.to_dict(),
        }
        write_saved(out, meta, self.plain_state_dict())

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with LoRA deltas merged and peft wrapper names removed."""
        state = self.state_dict()
        if not self._lora:
            return dict(state)
        plain: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if "lora_" in key:
                continue
            plain[_strip_peft(key)] = value
        for name, module in self.backbone.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
                weight = module.base_layer.weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                plain[_strip_peft(f"backbone.{name}.weight")] = (weight + delta).detach()
        return plain

    def fingerprint(self) -> str:
        """SHA-256 (16 hex chars) of the config and all weights (``packed`` and ``moe_dispatch``
        left out: they do not change the vectors)."""
        config = self.config.to_dict()
        config.pop("packed", None)
        config.pop("moe_dispatch", None)
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for key, value in sorted(self.plain_state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    # -- torch-level API --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def build_product_inputs(self, products: Sequence[Product]) -> list[EncodedInput]:
        """Products → inputs (CPU tensors); crops are added when ``config.use_crops``."""
        self.inputs.prefetch(products)
        return [self.inputs.product(p) for p in products]

    def build_query_inputs(self, queries: Sequence[Query]) -> list[EncodedInput]:
        self.inputs.prefetch(queries)
        return [self.inputs.query(q) for q in queries]

    def collate(self, items: Sequence[EncodedInput]) -> dict[str, torch.Tensor | None]:
        """Right-padded batch (CPU); see :func:`moon.model.inputs.collate`."""
        return collate(items, self.inputs.pad_id)

    @property
    def packing(self) -> bool:
        """Whether forwards run packed (``config.packed`` and a decoder that supports it, see
        :mod:`moon.model.packed`); read on every forward, so the switch can be flipped at any time."""
        return bool(self.config.packed and self._packable)

    def hidden_states(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Last hidden states ``(B, L, H)`` of a collated batch (MoE routed by the batch's aspect tags;
        packed without padding when :attr:`packing`, zeros at padding then)."""
        dev = self.device
        self.routing.aux_losses = []
        self.routing.dispatch = self.config.moe_dispatch
        packed = self.packing
        tags = batch["aspect_ids"].to(dev)
        if packed:  # the MoE sees the packed tokens, so it gets their tags only
            tags = tags[batch["attention_mask"].to(dev).bool()]
        with self.routing.using(tags):
            return self.family.hidden_states(self.backbone, batch, device=dev, dtype=self.dtype, packed=packed)

    def pooled(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Un-normalised embeddings ``(B, dim)`` (pooling, projection, Matryoshka cut)."""
        return self.finish_pooling(self.hidden_states(batch), batch)

    def _pool(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        c = self.config
        return pool(
            hidden,
            batch["attention_mask"].to(hidden.device),
            c.pooling,
            aspect_ids=batch["aspect_ids"] if c.pooling == "modality" else None,
            image_weight=c.pooling_image_weight,
        )

    def finish_pooling(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``(B, L, H)`` last hidden states → un-normalised ``(B, dim)`` float32 vectors."""
        vec = self._pool(hidden, batch)
        if self.config.center:
            vec = vec - self.center.to(vec.dtype)
        if self.projection is not None:
            vec = self.projection(vec)
        vec = vec.float()
        if self.config.matryoshka_dim:
            vec = vec[:, : self.config.matryoshka_dim]
        return vec

    def forward(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``(B, dim)`` float32 L2-normalised embeddings of a collated batch (with gradients)."""
        return F.normalize(self.pooled(batch), dim=-1)

    @torch.no_grad()
    def calibrate(self, products: Sequence[Product], queries: Sequence[Query] = (), *, batch_size: int = 16) -> None:
        """Set the centre (``config.center``) to the mean pooled vector of ``products`` and ``queries``
        (each side weighs half when both are given). The trainer calls this once, before the first
        step, on a seeded sample of the training data; a no-op when ``config.center`` is off."""
        if not self.config.center:
            return
        from moon import precision

        was_training = self.training
        self.eval()
        self.center.zero_()
        means = []
        try:
            with precision.autocast(self.config.precision, self.device):
                for records, build in ((products, self.inputs.product), (queries, self.inputs.query)):
                    if not records:
                        continue
                    total = torch.zeros_like(self.center, dtype=torch.float32)
                    for start in range(0, len(records), batch_size):
                        batch = self.collate([build(r) for r in records[start : start + batch_size]])
                        hidden = self.hidden_states(batch)
                        total += self._pool(hidden, batch).float().sum(0)
                    means.append(total / len(records))
        finally:
            self.train(was_training)
        if means:
            self.center.copy_(torch.stack(means).mean(0).to(self.center.dtype))

    def aux_loss(self) -> torch.Tensor:
        """Weighted MoE load-balancing loss of the last forward (0 for dense)."""
        return self.config.moe_aux_weight * aux_loss(self.routing, self.device)

    def routing_stats(self, reset: bool = False) -> dict[int, dict[str, Any]]:
        """Per MoE layer: ``{"aspects", "experts", "counts"}``, counts an ``(n_aspects, n_experts)``
        int64 array of top-1 routings of real tokens since the last reset."""
        stats = {
            layer: {"aspects": list(ASPECTS), "experts": list(EXPERTS), "counts": counts.cpu().numpy().copy()}
            for layer, counts in sorted(self.routing.counts.items())
        }
        if reset:
            self.routing.counts = {}
        return stats

    # -- encoding ---------------------------------------------------------------------------
    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """``(n, dim)`` float32, L2-normalised product vectors in input order."""
        return self._encode(list(products), self.inputs.product, batch_size, show_progress, "products")

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """``(n, dim)`` float32, L2-normalised query vectors in input order."""
        return self._encode(list(queries), self.inputs.query, batch_size, show_progress, "queries")

    def _encode(
        self, records: list, build: Callable[[Any], EncodedInput], batch_size: int, show_progress: bool, what: str
    ) -> np.ndarray:
        """The one encode loop (:func:`moon.models.encoding.encode_records`): image features of a
        window of records first (in full batches), then length-sorted batches under autocast."""
        from moon import precision
        from moon.models.encoding import encode_records

        return encode_records(
            self,
            records,
            lambda window: [build(r) for r in window],
            batch_size=batch_size,
            show_progress=show_progress,
            what=what,
            prefetch=self.inputs.prefetch,
            autocast=lambda: precision.autocast(self.config.precision, self.device),
            length=len,
        )

    # -- training helpers -------------------------------------------------------------------
    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant checkpointing of every decoder/vision block; MoE recomputation replays the
        aspect tags of its own forward."""
        base = self.family.checkpointing_module(self.backbone)
        kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn(self.routing)}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def enable_lora(
        self, r: int = 16, alpha: int = 32, target_modules: str | list[str] | None = None, dropout: float = 0.0
    ) -> None:
        """Wrap the backbone with peft LoRA (decoder attention + MLP/expert projections by default).

        Base weights are frozen; LoRA weights, MoE routers/guidance and the projection stay trainable.
        """
        from peft import LoraConfig, get_peft_model

        if self._lora:
            raise ConfigError("LoRA is already enabled on this embedder")
        lora = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or self.family.lora_targets
        )
        self.backbone = get_peft_model(self.backbone, lora)
        self._lora = True
        for moe in moe_layers(self.backbone):
            moe.router.weight.requires_grad_(True)
            moe.guidance.requires_grad_(True)
        if self.projection is not None:
            self.projection.requires_grad_(True)

    def freeze_vision(self) -> None:
        """Stop gradients into the vision tower (the graft's image encoder; its projector still trains)."""
        for p in self.family.vision_module(self.backbone).parameters():
            p.requires_grad_(False)

    def freeze_lower_layers(self, n: int) -> None:
        """Stop gradients into the token embeddings and the first ``n`` decoder layers (the layers
        above, the final norm, the MoE routers, the image side and the projection still train)."""
        text = self.family.text_model(self.backbone)
        layers = text.layers
        if not 0 <= n <= len(layers):
            raise ConfigError(f"freeze_lower_layers={n}: the decoder has {len(layers)} layers")
        if n == 0:
            return
        text.get_input_embeddings().requires_grad_(False)
        for layer in layers[:n]:
            layer.requires_grad_(False)

    # -- explanations -----------------------------------------------------------------------
    def explain_product(self, product: Product) -> list[np.ndarray]:
        """Per product image (crops excluded), a float32 map in [0, 1] of how much each image region
        contributes to the product vector: |gradient × input| of the pooled vector's projection on its
        own direction, per merged vision patch (Qwen-VL, ``(grid_h, grid_w)``) or per cell of the image
        encoder's feature map (graft, e.g. 7 × 7)."""
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                return self.family.explain(self, product)
        finally:
            self.train(was_training)
            self.zero_grad(set_to_none=True)


def _strip_peft(key: str) -> str:
    return key.replace("backbone.base_model.model.", "backbone.").replace(".base_layer.", ".")


def load_moon(arg: str | None = None, **overrides: Any) -> MoonEmbedder:
    """The ``moon`` family's loader (:mod:`moon.models.registry`): a preset, a saved directory or a
    hub id (``moon-tiny`` when ``arg`` is ``None``), with MoonConfig overrides."""
    return MoonEmbedder.from_pretrained(arg or "moon-tiny", **overrides)


__all__ = ["MoonEmbedder", "backbone_config_from_dict", "load_moon"]
