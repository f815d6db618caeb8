"""The MOON embedder: a Qwen-VL backbone that embeds whole products and queries.

``MoonEmbedder.from_pretrained(name_or_path)`` accepts a preset name (``moon-tiny``,
``moon-small``, ``moon-3b``), a directory written by :meth:`MoonEmbedder.save_pretrained`, a
transformers Qwen-VL checkpoint directory or a hub id. Importing this module registers the
``moon`` family with :func:`moon.embedders.load_embedder`.
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
from moon.embedders import EMBEDDER_FILE, register_embedder
from moon.errors import ConfigError
from moon.model.backbone import (
    backbone_config_from_dict,
    base_model,
    build_backbone,
    language_model,
    load_backbone,
    preset_backbone_config,
)
from moon.model.config import ASPECTS, EXPERTS, PRESETS, MoonConfig
from moon.model.inputs import EncodedInput, InputBuilder, collate
from moon.model.moe import RoutingState, aux_loss, checkpoint_context_fn, moe_layers, upcycle
from moon.model.pooling import pool
from moon.model.processors import image_processor, load_tokenizer, qwen2_tokenizer

WEIGHTS_FILE = "model.safetensors"
BACKBONE_DIR = "backbone"
PROCESSOR_DIR = "processor"
FORMAT_VERSION = 1
_STRUCTURAL = ("moe_mode", "moe_layers", "moe_top_k", "projection_dim")
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MoonEmbedder(nn.Module):
    """Product/query embedder over a Qwen-VL backbone (implements ``TrainableEmbedder``).

    ``encode_products`` / ``encode_queries`` return float32 ``(n, dim)`` arrays, L2-normalised.
    """

    def __init__(self, config: MoonConfig, backbone: nn.Module, tokenizer, *, name: str | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.name = name or config.backbone
        self.routing = RoutingState()
        bcfg = base_model(backbone).config
        text_cfg = bcfg.get_text_config()
        vcfg = bcfg.vision_config
        self.image_token_id = int(bcfg.image_token_id)
        self.image_processor = image_processor(
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            patch_size=vcfg.patch_size,
            merge_size=vcfg.spatial_merge_size,
            temporal_patch_size=vcfg.temporal_patch_size,
        )
        self.merge_size = int(vcfg.spatial_merge_size)
        self.inputs = InputBuilder(config, tokenizer, self.image_processor, merge_size=self.merge_size)
        hidden = int(text_cfg.hidden_size)
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
            language_model(self.backbone),
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
        """Load a preset, a saved MOON directory, a Qwen-VL checkpoint directory or a hub id.

        ``overrides`` are :class:`MoonConfig` fields (``moe_mode="dense"``, ``pooling="last"`` …).
        ``device`` defaults to CUDA when available; ``dtype`` to bf16 on CUDA, float32 on CPU.
        ``device="meta"`` builds a preset's structure without allocating weights.
        """
        name_or_path = str(name_or_path)
        dev = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        path = Path(name_or_path)
        if (path / EMBEDDER_FILE).is_file():
            emb = cls._load_saved(path, overrides)
        elif name_or_path in PRESETS:
            config = MoonConfig(backbone=name_or_path, **PRESETS[name_or_path][1]).replace(**overrides)
            backbone = build_backbone(preset_backbone_config(name_or_path), seed=config.seed, device=dev)
            emb = cls(config, backbone, qwen2_tokenizer(), name=name_or_path)
        else:
            config = MoonConfig(backbone=name_or_path).replace(**overrides)
            backbone = load_backbone(name_or_path, dtype=dtype)
            emb = cls(config, backbone, load_tokenizer(name_or_path), name=name_or_path)
        if dev.type != "meta":
            emb.to(device=dev, dtype=dtype)
        return emb.eval()

    @classmethod
    def _load_saved(cls, path: Path, overrides: dict[str, Any]) -> MoonEmbedder:
        from safetensors.torch import load_file
        from transformers import AutoConfig

        meta = json.loads((path / EMBEDDER_FILE).read_text(encoding="utf-8"))
        if meta.get("family") != "moon":
            raise ConfigError(f"{path / EMBEDDER_FILE}: family {meta.get('family')!r} is not 'moon'")
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
        bcfg = AutoConfig.from_pretrained(str(path / BACKBONE_DIR))
        backbone = build_backbone(bcfg, seed=saved.seed)
        tokenizer = (
            qwen2_tokenizer() if meta.get("tokenizer") == "qwen2-offline" else load_tokenizer(path / PROCESSOR_DIR)
        )
        emb = cls(saved, backbone, tokenizer, name=meta.get("name"))
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise ConfigError(f"{path}: {WEIGHTS_FILE} is missing")
        emb.load_state_dict(load_file(str(weights)), strict=True)
        if upcycle_after or config != saved:
            emb.config = config
            emb.inputs.config = config
            emb.image_processor = emb.inputs.image_processor = image_processor(
                min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=bcfg.vision_config.patch_size,
                merge_size=emb.merge_size, temporal_patch_size=bcfg.vision_config.temporal_patch_size,
            )  # fmt: skip
            if upcycle_after:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(config.seed + 1)
                    emb.upcycle()
            pooled = config.projection_dim or base_model(emb.backbone).config.get_text_config().hidden_size
            emb.dim = min(config.matryoshka_dim, pooled) if config.matryoshka_dim else pooled
        return emb

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``embedder.json``, ``model.safetensors`` (LoRA merged), the backbone config and the
        tokenizer/image processor, so that ``from_pretrained(directory)`` works offline."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.plain_state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        base_model(self.backbone).config.save_pretrained(str(out / BACKBONE_DIR))
        self.tokenizer.save_pretrained(str(out / PROCESSOR_DIR))
        self.image_processor.save_pretrained(str(out / PROCESSOR_DIR))
        meta = {
            "family": "moon",
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "dim": self.dim,
            "moe_layers": self.moe_layer_ids,
            # the offline Qwen2 tokenizer is rebuilt from its cache on load (the files are saved too)
            "tokenizer": "qwen2-offline" if self.tokenizer is qwen2_tokenizer() else "saved",
            "config": self.config.to_dict(),
        }
        (out / EMBEDDER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

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
        """SHA-256 (16 hex chars) of the config and all weights."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
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
        return [self.inputs.product(p) for p in products]

    def build_query_inputs(self, queries: Sequence[Query]) -> list[EncodedInput]:
        return [self.inputs.query(q) for q in queries]

    def collate(self, items: Sequence[EncodedInput]) -> dict[str, torch.Tensor | None]:
        """Right-padded batch (CPU); see :func:`moon.model.inputs.collate`."""
        return collate(items, self.inputs.pad_id)

    def hidden_states(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Last hidden states ``(B, L, H)`` of a collated batch (MoE routed by the batch's aspect tags)."""
        dev = self.device
        ids = batch["input_ids"].to(dev)
        mask = batch["attention_mask"].to(dev)
        tags = batch["aspect_ids"].to(dev)
        pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pixels is not None:
            pixels = pixels.to(dev, dtype=self.dtype)
            grid = grid.to(dev)
        mm = (ids == self.image_token_id).long()
        positions, _ = base_model(self.backbone).get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask
        )
        self.routing.aux_losses = []
        with self.routing.using(tags):
            out = self.backbone(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                pixel_values=pixels,
                image_grid_thw=grid,
                mm_token_type_ids=mm,
                use_cache=False,
            )
        return out.last_hidden_state

    def pooled(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Un-normalised embeddings ``(B, dim)`` (pooling, projection, Matryoshka cut)."""
        hidden = self.hidden_states(batch)
        vec = pool(hidden, batch["attention_mask"].to(hidden.device), self.config.pooling)
        if self.projection is not None:
            vec = self.projection(vec)
        vec = vec.float()
        if self.config.matryoshka_dim:
            vec = vec[:, : self.config.matryoshka_dim]
        return vec

    def forward(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``(B, dim)`` float32 L2-normalised embeddings of a collated batch (with gradients)."""
        return F.normalize(self.pooled(batch), dim=-1)

    def aux_loss(self) -> torch.Tensor:
        """Weighted MoE load-balancing loss of the last forward (0 for dense)."""
        return self.config.moe_aux_weight * aux_loss(self.routing, self.device)

    def routing_stats(self, reset: bool = False) -> dict[int, dict[str, Any]]:
        """Per MoE layer: ``{"aspects", "experts", "counts"}``, counts an ``(n_aspects, n_experts)``
        int64 array of top-1 routings of real tokens since the last reset."""
        stats = {
            layer: {"aspects": list(ASPECTS), "experts": list(EXPERTS), "counts": counts.numpy().copy()}
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
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1")
        out = np.zeros((len(records), self.dim), dtype=np.float32)
        if not records:
            return out
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        window = batch_size * 16  # build and length-sort this many records at a time
        try:
            with torch.no_grad(), tqdm(total=len(records), desc=f"encode {what}", disable=not show_progress) as bar:
                for start in range(0, len(records), window):
                    items = [build(r) for r in records[start : start + window]]
                    order = sorted(range(len(items)), key=lambda i: len(items[i]))
                    for b in range(0, len(order), batch_size):
                        idx = order[b : b + batch_size]
                        vecs = self.forward(self.collate([items[i] for i in idx]))
                        out[[start + i for i in idx]] = vecs.float().cpu().numpy()
                        bar.update(len(idx))
        finally:
            self.train(was_training)
        return out

    # -- training helpers -------------------------------------------------------------------
    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant checkpointing of every decoder/vision block; MoE recomputation replays the
        aspect tags of its own forward."""
        base = base_model(self.backbone)
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
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or DEFAULT_LORA_TARGETS
        )
        self.backbone = get_peft_model(self.backbone, lora)
        self._lora = True
        for moe in moe_layers(self.backbone):
            moe.router.weight.requires_grad_(True)
            moe.guidance.requires_grad_(True)
        if self.projection is not None:
            self.projection.requires_grad_(True)

    def freeze_vision(self) -> None:
        """Stop gradients into the vision tower."""
        for p in base_model(self.backbone).visual.parameters():
            p.requires_grad_(False)

    # -- explanations -----------------------------------------------------------------------
    def explain_product(self, product: Product) -> list[np.ndarray]:
        """Per product image (crops excluded), a ``(grid_h, grid_w)`` float32 map in [0, 1] of how much
        each merged vision patch contributes to the product vector (|gradient × input|, summed
        over the patch's pixels, of the pooled vector's projection on its own direction)."""
        item = self.inputs.product(product)
        if item.pixel_values is None:
            return []
        batch = self.collate([item])
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                pixels = batch["pixel_values"].to(self.device, dtype=self.dtype).requires_grad_(True)
                batch["pixel_values"] = pixels
                vec = self.pooled(batch)[0]
                (vec * F.normalize(vec.detach(), dim=-1)).sum().backward(inputs=[pixels])
                contrib = (pixels.grad.float() * pixels.detach().float()).sum(-1).cpu()
        finally:
            self.train(was_training)
            self.zero_grad(set_to_none=True)
        maps: list[np.ndarray] = []
        start = 0
        m = self.merge_size
        for (t, h, w), aspect in zip(item.image_grid_thw.tolist(), item.image_aspects, strict=True):
            n = t * h * w
            chunk = contrib[start : start + n].reshape(t, h // m, w // m, m * m).sum(-1).abs().mean(0)
            start += n
            if aspect != "vision":
                continue
            peak = float(chunk.max())
            maps.append((chunk / peak if peak > 0 else chunk).numpy().astype(np.float32))
        return maps


def _strip_peft(key: str) -> str:
    return key.replace("backbone.base_model.model.", "backbone.").replace(".base_layer.", ".")


def _factory(arg: str | None = None, **kwargs: Any) -> MoonEmbedder:
    return MoonEmbedder.from_pretrained(arg or "moon-tiny", **kwargs)


register_embedder("moon", _factory)

__all__ = ["MoonEmbedder", "backbone_config_from_dict"]
