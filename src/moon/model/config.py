"""The typed MOON embedder config and the offline presets.

:class:`MoonConfig` holds everything the embedder needs besides weights: where the backbone comes
from, input building (images, pixels, text budget, instruction prefixes), pooling and the guided
MoE. It round-trips through JSON (``to_dict`` / ``from_dict``).

Presets (``moon-tiny``, ``moon-small``, ``moon-3b``) are backbone shapes built from configs with
random, seeded weights: the same name and seed always give the same weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moon.errors import ConfigError

#: Aspect tags, one per token; the index is the tag id carried in ``EncodedInput.aspect_ids``.
ASPECTS: tuple[str, ...] = ("template", "vision", "crop", "title", "category", "attribute", "query_text")
#: Aspect experts of the guided MoE (the shared expert is always on and not listed).
EXPERTS: tuple[str, ...] = ("vision", "text", "category", "attribute")
#: Which expert each aspect is guided to.
ASPECT_TO_EXPERT: dict[str, str] = {
    "template": "text",
    "vision": "vision",
    "crop": "vision",
    "title": "text",
    "category": "category",
    "attribute": "attribute",
    "query_text": "text",
}
MOE_MODES = ("guided", "hard", "learned", "dense")
POOLINGS = ("mean", "last")


@dataclass
class MoonConfig:
    """Everything about a MOON embedder except its weights.

    Attributes:
        backbone: the preset name, local directory or hub id the backbone came from.
        seed: seed of the random init for presets (and of the MoE routers when upcycling).
        pooling: ``mean`` (masked mean of the last hidden states, the paper's) or ``last`` token.
        projection_dim: optional linear projection after pooling (``None``: none, the paper's).
        matryoshka_dim: keep only the first this-many dimensions (before L2 normalisation).
        max_images: product/query images kept per record (extra ones are dropped with a warning).
        min_pixels / max_pixels: image resolution range handed to the Qwen2-VL image processor.
        max_text_tokens: text token budget per record (the title is shortened first, with a warning).
        use_crops / query_crops: add ``record.crops`` as extra images (aspect ``crop``).
        product_instruction / query_instruction: prefixes of product and query sequences.
        moe_mode: ``guided``, ``hard``, ``learned`` or ``dense`` (no MoE).
        moe_layers: decoder layer indexes to upcycle (``None``: all).
        moe_top_k: aspect experts chosen per token (the shared expert is always on).
        moe_guidance_init: initial guidance-table value for an aspect's own expert.
        moe_guidance_scale: gamma, the weight of the guidance term in the router logits.
        moe_aux_weight: weight of the Switch load-balancing loss returned by ``aux_loss()``.
    """

    backbone: str = "moon-tiny"
    seed: int = 0
    pooling: str = "mean"
    projection_dim: int | None = None
    matryoshka_dim: int | None = None
    max_images: int = 8
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    max_text_tokens: int = 256
    use_crops: bool = True
    query_crops: bool = True
    product_instruction: str = "Represent this product for retrieval.\n"
    query_instruction: str = "Find the product for this query.\n"
    moe_mode: str = "guided"
    moe_layers: list[int] | None = None
    moe_top_k: int = 1
    moe_guidance_init: float = 4.0
    moe_guidance_scale: float = 1.0
    moe_aux_weight: float = 0.01
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field and value."""
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.moe_mode not in MOE_MODES:
            raise ConfigError(f"moe_mode={self.moe_mode!r}: expected one of {', '.join(MOE_MODES)}")
        if not 1 <= self.moe_top_k <= len(EXPERTS):
            raise ConfigError(f"moe_top_k={self.moe_top_k}: must be between 1 and {len(EXPERTS)}")
        if self.max_images < 0:
            raise ConfigError(f"max_images={self.max_images}: must be >= 0")
        if self.max_text_tokens < 16:
            raise ConfigError(f"max_text_tokens={self.max_text_tokens}: must be >= 16")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(
                f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}: need 0 < min_pixels <= max_pixels"
            )
        for name in ("projection_dim", "matryoshka_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: must be a positive integer or null")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoonConfig:
        """Build from a dict; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MoonConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **overrides: Any) -> MoonConfig:
        """A copy with ``overrides`` applied (unknown names raise :class:`ConfigError`)."""
        data = self.to_dict()
        data.update(overrides)
        return MoonConfig.from_dict(data)


# Qwen2.5-VL token ids (the real ones; the tokenizer test checks them).
_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def _qwen25_config(
    *,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv_heads: int,
    v_depth: int,
    v_hidden: int,
    v_inter: int,
    v_heads: int,
    fullatt: list[int],
    window: int,
) -> dict[str, Any]:
    head_dim = hidden // heads
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    return {
        "model_type": "qwen2_5_vl",
        "text_config": {
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1_000_000.0},
            **_TOKEN_IDS,
        },
        "vision_config": {
            "depth": v_depth,
            "hidden_size": v_hidden,
            "intermediate_size": v_inter,
            "num_heads": v_heads,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": fullatt,
            "window_size": window,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "tie_word_embeddings": True,
        **_TOKEN_IDS,
    }


#: preset name → (backbone config dict, MoonConfig overrides)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "moon-tiny": (
        _qwen25_config(
            hidden=64,
            inter=128,
            layers=2,
            heads=4,
            kv_heads=2,
            v_depth=2,
            v_hidden=32,
            v_inter=64,
            v_heads=2,
            fullatt=[1],
            window=112,  # = max image side: one attention window per image
        ),
        {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "max_text_tokens": 128},
    ),
    "moon-small": (
        _qwen25_config(
            hidden=256,
            inter=512,
            layers=4,
            heads=4,
            kv_heads=2,
            v_depth=4,
            v_hidden=128,
            v_inter=256,
            v_heads=4,
            fullatt=[1, 3],
            window=112,  # = max image side: one attention window per image
        ),
        {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "max_text_tokens": 128},
    ),
    # The Qwen2.5-VL-3B shape (random init, for GPU benchmarks). Upcycling all 36 layers into
    # 1 + 4 experts would make a ~12B model, so the preset upcycles the last 4 layers only.
    "moon-3b": (
        _qwen25_config(
            hidden=2048,
            inter=11008,
            layers=36,
            heads=16,
            kv_heads=2,
            v_depth=32,
            v_hidden=1280,
            v_inter=3420,
            v_heads=16,
            fullatt=[7, 15, 23, 31],
            window=112,
        ),
        {"min_pixels": 56 * 56, "max_pixels": 448 * 448, "max_text_tokens": 256, "moe_layers": [32, 33, 34, 35]},
    ),
}
