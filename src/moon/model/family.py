"""Backbone families: the one place that knows how a kind of backbone is built, fed and saved.

:class:`MoonEmbedder` owns everything that is the same for every backbone — aspect-tagged inputs,
the guided MoE (upcycled on the family's decoder layers), pooling, LoRA, checkpointing, save/load,
heat-maps, encoding — and asks its :class:`BackboneFamily` for the rest:

* ``qwen-vl`` (:class:`QwenVLFamily`): a transformers Qwen2/2.5/3-VL base model; images go through
  the Qwen2-VL image processor and the model's own vision tower (M-RoPE positions);
* ``graft`` (:class:`GraftFamily`): a pretrained image encoder → projector → any causal LM
  (:mod:`moon.model.graft`).

A family is chosen by the config: ``MoonConfig.graft`` set → graft, else Qwen-VL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from moon.model.backbone import backbone_config_from_dict, base_model, build_backbone, hf_reason, language_model
from moon.model.config import ASPECTS, MoonConfig
from moon.model.inputs import InputBuilder, Markers, QwenImageInputs

if TYPE_CHECKING:
    from moon.data import Product
    from moon.model.embedder import MoonEmbedder

BACKBONE_DIR = "backbone"
PROCESSOR_DIR = "processor"
_PROJ = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_VISUAL_TAGS = (ASPECTS.index("vision"), ASPECTS.index("crop"))


class BackboneFamily(ABC):
    """What the embedder needs to know about one kind of backbone (see the module docstring)."""

    name: str
    #: peft ``target_modules`` regex for the default LoRA (decoder attention + MLP/expert projections)
    lora_targets: str

    @abstractmethod
    def text_model(self, backbone: nn.Module) -> nn.Module:
        """The decoder stack (has ``layers``; the MoE is upcycled there)."""

    @abstractmethod
    def hidden_size(self, backbone: nn.Module) -> int: ...

    @abstractmethod
    def input_builder(self, config: MoonConfig, tokenizer: Any, backbone: nn.Module) -> InputBuilder: ...

    @abstractmethod
    def hidden_states(
        self,
        backbone: nn.Module,
        batch: dict[str, Any],
        *,
        device: torch.device,
        dtype: torch.dtype,
        packed: bool = False,
    ) -> torch.Tensor:
        """Last hidden states ``(B, L, H)`` of a collated batch (routing tags are set by the caller).

        ``packed``: run the decoder on the real tokens only (:mod:`moon.model.packed`; zeros at
        padding; only when :meth:`install_packing` returned True), else the padded forward.
        """

    def install_packing(self, backbone: nn.Module) -> bool:
        """Prepare the decoder for packed sequences; whether the packed path can run on this
        backbone (default: no, the family keeps its padded forward)."""
        return False

    @abstractmethod
    def vision_module(self, backbone: nn.Module) -> nn.Module:
        """The image side (frozen by ``freeze_vision``)."""

    @abstractmethod
    def save_backbone(self, emb: MoonEmbedder, directory: Path) -> None:
        """Write what :meth:`build_saved` needs besides the weights (configs, tokenizer, processor)."""

    @abstractmethod
    def build_saved(self, directory: Path, config: MoonConfig) -> nn.Module:
        """The architecture of a saved backbone (weights are loaded next from ``model.safetensors``)."""

    @abstractmethod
    def explain(self, emb: MoonEmbedder, product: Product) -> list[np.ndarray]:
        """Per product image (crops excluded), a map in [0, 1] of what drives the product vector."""

    def checkpointing_module(self, backbone: nn.Module) -> nn.Module:
        """The transformers model whose blocks gradient checkpointing wraps."""
        return base_model(backbone)


def family_for(config: MoonConfig) -> BackboneFamily:
    return GRAFT if config.graft is not None else QWEN_VL


def _normalised_maps(contrib: torch.Tensor, aspects: list[str]) -> list[np.ndarray]:
    maps = []
    for chunk, aspect in zip(contrib, aspects, strict=True):
        if aspect != "vision":
            continue
        peak = float(chunk.max())
        maps.append((chunk / peak if peak > 0 else chunk).numpy().astype(np.float32))
    return maps


# --------------------------------------------------------------------------- Qwen-VL


class QwenVLFamily(BackboneFamily):
    name = "qwen-vl"
    lora_targets = rf".*language_model.*\.{_PROJ}$"

    def text_model(self, backbone: nn.Module) -> nn.Module:
        return language_model(backbone)

    def hidden_size(self, backbone: nn.Module) -> int:
        return int(base_model(backbone).config.get_text_config().hidden_size)

    def image_processor(self, config: MoonConfig, backbone: nn.Module):
        from moon.model.processors import image_processor

        vcfg = base_model(backbone).config.vision_config
        return image_processor(
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            patch_size=vcfg.patch_size,
            merge_size=vcfg.spatial_merge_size,
            temporal_patch_size=vcfg.temporal_patch_size,
        )

    def input_builder(self, config: MoonConfig, tokenizer: Any, backbone: nn.Module) -> InputBuilder:
        merge = int(base_model(backbone).config.vision_config.spatial_merge_size)
        images = QwenImageInputs(self.image_processor(config, backbone), merge_size=merge)
        return InputBuilder(config, tokenizer, images, Markers.qwen_vl(tokenizer))

    #: base model types whose packed forward is :meth:`_packed_hidden_states` (Qwen3-VL adds deepstack
    #: visual features inside its decoder, which that forward does not feed)
    PACKABLE = ("qwen2_vl", "qwen2_5_vl")

    def install_packing(self, backbone: nn.Module) -> bool:
        from moon.model.packed import install

        model_type = getattr(base_model(backbone).config, "model_type", None)
        if model_type not in self.PACKABLE:
            return False
        return install(self.text_model(backbone))

    def hidden_states(self, backbone, batch, *, device, dtype, packed=False):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pixels is not None:
            pixels = pixels.to(device, dtype=dtype)
            grid = grid.to(device)
        base = base_model(backbone)
        mm = (ids == int(base.config.image_token_id)).long()
        positions, _ = base.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask)
        if packed:
            return self._packed_hidden_states(backbone, ids, mask, positions, pixels, grid)
        out = backbone(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            pixel_values=pixels,
            image_grid_thw=grid,
            mm_token_type_ids=mm,
            use_cache=False,
        )
        return out.last_hidden_state

    def _packed_hidden_states(self, backbone, ids, mask, positions, pixels, grid) -> torch.Tensor:
        """The padded forward's computation on the real tokens only (:mod:`moon.model.packed`): the
        same token embeddings, image features (the vision tower runs all images concatenated, as in
        the padded forward) placed at the image tokens in the same order, the same M-RoPE position
        ids (``positions``, from the padded batch) gathered to ``(3, 1, T)``, and block-diagonal
        attention; zeros at padding."""
        from moon.model.packed import PackedLayout, decoder_forward

        base = base_model(backbone)
        layout = PackedLayout.from_mask(mask)
        row = layout.pack(ids.unsqueeze(-1)).squeeze(-1)  # (1, T)
        embeds = base.get_input_embeddings()(row)
        if pixels is not None:
            feats = base.get_image_features(pixels, grid, return_dict=True).pooler_output
            feats = torch.cat(feats, dim=0).to(embeds.device, embeds.dtype)
            slots = row == int(base.config.image_token_id)
            if int(slots.sum()) != feats.shape[0]:
                raise ValueError(f"qwen-vl: {int(slots.sum())} image tokens but {feats.shape[0]} image features")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats)
        hidden = decoder_forward(self.text_model(backbone), embeds, layout, positions=layout.pack_positions(positions))
        return layout.unpack(hidden)

    def vision_module(self, backbone: nn.Module) -> nn.Module:
        return base_model(backbone).visual

    def save_backbone(self, emb: MoonEmbedder, directory: Path) -> None:
        base_model(emb.backbone).config.save_pretrained(str(directory / BACKBONE_DIR))
        emb.inputs.images.image_processor.save_pretrained(str(directory / PROCESSOR_DIR))  # type: ignore[attr-defined]

    def build_saved(self, directory: Path, config: MoonConfig) -> nn.Module:
        from transformers import AutoConfig

        from moon.errors import ConfigError

        try:
            bcfg = AutoConfig.from_pretrained(str(directory / BACKBONE_DIR), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{directory / BACKBONE_DIR}: not a loadable backbone config ({hf_reason(exc)})") from exc
        return build_backbone(bcfg, seed=config.seed)

    def explain(self, emb: MoonEmbedder, product: Product) -> list[np.ndarray]:
        """|gradient × input| summed over each merged vision patch's pixels."""
        item = emb.inputs.product(product)
        if item.pixel_values is None:
            return []
        batch = emb.collate([item])
        pixels = batch["pixel_values"].to(emb.device, dtype=emb.dtype).requires_grad_(True)
        batch["pixel_values"] = pixels
        vec = emb.pooled(batch)[0]
        (vec * torch.nn.functional.normalize(vec.detach(), dim=-1)).sum().backward(inputs=[pixels])
        contrib = (pixels.grad.float() * pixels.detach().float()).sum(-1).cpu()
        m = emb.inputs.images.merge_size  # type: ignore[attr-defined]
        chunks, start = [], 0
        for t, h, w in item.image_grid_thw.tolist():
            n = t * h * w
            chunks.append(contrib[start : start + n].reshape(t, h // m, w // m, m * m).sum(-1).abs().mean(0))
            start += n
        return _normalised_maps(chunks, item.image_aspects)


# --------------------------------------------------------------------------- graft


class GraftFamily(BackboneFamily):
    name = "graft"
    lora_targets = rf".*\blm\..*\.{_PROJ}$"

    def text_model(self, backbone: nn.Module) -> nn.Module:
        return base_model(backbone).lm

    def hidden_size(self, backbone: nn.Module) -> int:
        return base_model(backbone).hidden_size

    def input_builder(self, config: MoonConfig, tokenizer: Any, backbone: nn.Module) -> InputBuilder:
        from moon.model.graft import GraftImageInputs

        spec = config.graft
        assert spec is not None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad
        if end is None:
            raise ValueError("graft: the tokenizer has neither an eos nor a pad token")
        enc = tokenizer([spec.image_open, spec.image_close], add_special_tokens=False)["input_ids"]
        markers = Markers(tuple(enc[0]), tuple(enc[1]), image_pad=int(pad), end=int(end), pad=int(pad))
        return InputBuilder(config, tokenizer, GraftImageInputs(base_model(backbone)), markers)

    def install_packing(self, backbone: nn.Module) -> bool:
        from moon.model.packed import install

        return install(self.text_model(backbone))

    def hidden_states(self, backbone, batch, *, device, dtype, packed=False, features: torch.Tensor | None = None):
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        tags = batch["aspect_ids"].to(device)
        image_mask = (tags == _VISUAL_TAGS[0]) | (tags == _VISUAL_TAGS[1])
        payload = batch.get("pixel_values")
        if payload is not None:
            payload = payload.to(device)
        return backbone(
            input_ids=ids, attention_mask=mask, image_mask=image_mask, payload=payload, features=features, packed=packed
        )

    def vision_module(self, backbone: nn.Module) -> nn.Module:
        return base_model(backbone).vision

    def checkpointing_module(self, backbone: nn.Module) -> nn.Module:
        return base_model(backbone).lm

    def save_backbone(self, emb: MoonEmbedder, directory: Path) -> None:
        from moon.model.graft import save_graft_config

        save_graft_config(base_model(emb.backbone), directory / BACKBONE_DIR)

    def build_saved(self, directory: Path, config: MoonConfig) -> nn.Module:
        from moon.model.graft import build_saved_graft

        assert config.graft is not None
        return build_saved_graft(config.graft, directory / BACKBONE_DIR)

    def explain(self, emb: MoonEmbedder, product: Product) -> list[np.ndarray]:
        """|gradient × input| of the encoder's feature map (summed over channels), per map cell."""
        from moon.data import load_image

        graft = base_model(emb.backbone)
        refs, aspects = emb.inputs.image_refs(product.images, product.crops, emb.config.use_crops, product.id)
        if not refs:
            return []
        batch = emb.collate([emb.inputs.product(product)])
        pixels = torch.stack([graft.vision.preprocess(load_image(r)) for r in refs]).to(emb.device)
        with torch.no_grad():
            fmap = graft.vision(pixels).float()
        fmap.requires_grad_(True)
        features = graft.pooled_tokens(fmap)
        dev = emb.device
        with emb.routing.using(batch["aspect_ids"].to(dev)):
            hidden = self.hidden_states(emb.backbone, batch, device=dev, dtype=emb.dtype, features=features)
        vec = emb.finish_pooling(hidden, batch)[0]
        (vec * torch.nn.functional.normalize(vec.detach(), dim=-1)).sum().backward(inputs=[fmap])
        contrib = (fmap.grad * fmap.detach()).sum(1).abs().cpu()
        return _normalised_maps(list(contrib), aspects)


QWEN_VL = QwenVLFamily()
GRAFT = GraftFamily()

__all__ = [
    "GRAFT",
    "QWEN_VL",
    "BackboneFamily",
    "GraftFamily",
    "QwenVLFamily",
    "backbone_config_from_dict",
    "family_for",
]
