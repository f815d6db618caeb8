"""The typed MOON embedder config and the offline presets.

:class:`MoonConfig` holds everything the embedder needs besides weights: where the backbone comes
from, input building (images, pixels, text budget, instruction prefixes), pooling and the guided
MoE. It round-trips through JSON (``to_dict`` / ``from_dict``).

Presets (``moon-tiny``, ``moon-small``, ``moon-3b``) are backbone shapes built from configs with
random, seeded weights: the same name and seed always give the same weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
#: how MoE layers run their experts (:attr:`MoonConfig.moe_dispatch`)
MOE_DISPATCHES = ("auto", "loop", "grouped_mm")
POOLINGS = ("mean", "last", "modality")


@dataclass
class GraftConfig:
    """What a graft backbone is made of (a field of :class:`moon.model.MoonConfig`).

    Attributes:
        lm: the causal LM: ``asset:NAME`` (see ``moon assets list``), a local transformers
            directory, a hub id, or ``random`` (built from ``lm_config`` with the config's seed).
        lm_config: a transformers config dict with ``model_type`` (only for ``lm="random"``).
        tokenizer: ``None`` (the LM's own) or ``qwen2-offline`` (MOON's offline Qwen2 tokenizer).
        image_encoder: a name of :func:`moon.model.image_encoders.build_image_encoder`.
        image_size: the encoder's input side (``None``: its default, 224 for EfficientNet-Lite0).
        image_tokens: visual tokens per image, a square number (the pooled grid is √k × √k).
        keep_layers: keep only the first N decoder layers of the LM (``None``: all).
        freeze_image_encoder: never train the encoder; cache its features (see the module docstring).
        projector_hidden: hidden width of the 2-layer MLP projector (``None``: the LM's hidden size).
        image_open / image_close: the text that brackets each image's visual tokens.
        feature_cache: at most this many images' features are kept in the process-wide cache.
        image_precision: what the frozen encoder computes in: ``fp32`` (default), ``bf16``, or
            ``auto`` (bf16 where the hardware runs it natively, :mod:`moon.precision`). bf16 is
            several times faster on CPUs with AVX-512 BF16 but moves the features (about 3 %
            relative on EfficientNet-Lite0), so it is a choice, not a default; the cache keys
            include it.
    """

    lm: str = "asset:smollm2-135m"
    lm_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    image_encoder: str = "efficientnet-lite0"
    image_size: int | None = None
    image_tokens: int = 4
    keep_layers: int | None = None
    freeze_image_encoder: bool = True
    projector_hidden: int | None = None
    image_open: str = "<image>"
    image_close: str = ""
    feature_cache: int = 20000
    image_precision: str = "fp32"

    def __post_init__(self) -> None:
        side = math.isqrt(self.image_tokens) if self.image_tokens > 0 else 0
        if self.image_tokens < 1 or side * side != self.image_tokens:
            raise ConfigError(f"graft.image_tokens={self.image_tokens}: must be a square number (1, 4, 9, 16 …)")
        if self.keep_layers is not None and self.keep_layers < 1:
            raise ConfigError(f"graft.keep_layers={self.keep_layers}: must be >= 1 or null")
        if self.lm == "random" and not self.lm_config:
            raise ConfigError("graft.lm=random needs graft.lm_config (a transformers config dict with model_type)")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"graft.image_size={self.image_size}: must be >= 16")
        if self.feature_cache < 0:
            raise ConfigError(f"graft.feature_cache={self.feature_cache}: must be >= 0")
        if self.image_precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"graft.image_precision={self.image_precision!r}: expected auto, fp32 or bf16")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | GraftConfig) -> GraftConfig:
        if isinstance(data, GraftConfig):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"graft: expected a mapping, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown graft field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class MoonConfig:
    """Everything about a MOON embedder except its weights.

    Attributes:
        backbone: the preset name, local directory or hub id the backbone came from.
        seed: seed of the random init for presets (and of the MoE routers when upcycling).
        pooling: ``mean`` (masked mean of the last hidden states, the paper's), ``last`` token, or
            ``modality``: the means of the visual tokens and of the text tokens, each L2-normalised,
            mixed with weight ``pooling_image_weight`` on the visual side (a late fusion inside one
            sequence; :func:`moon.model.pooling.pool`).
        pooling_image_weight: the visual side's weight for ``pooling: modality`` (0 < w < 1).
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
        center: subtract a centre vector (set by :meth:`MoonEmbedder.calibrate` from a sample of
            records; zero until then) from the pooled vector before normalising. A pretrained LM's
            mean-pooled states share one dominant direction (mean product cosine ≈ 0.99 for
            SmolLM2): centring removes it (cf. BERT-whitening), see docs/model.md.
        precision: what ``encode_products``/``encode_queries`` compute in: ``fp32``; ``bf16``
            (autocast); ``auto`` = bf16 on CUDA and on CPUs with native bf16, else fp32
            (:mod:`moon.precision`). Training precision is ``run.precision`` of the trainer.
        packed: run the decoder on the real tokens of a batch only (block-diagonal attention, no
            padding; :mod:`moon.model.packed`): the graft family and Qwen2-VL / Qwen2.5-VL (M-RoPE
            positions per sequence). Same vectors as the padded path (tested to 1e-5 in float32), so
            it is on by default; decoders it cannot run (Qwen3-VL, sliding windows, other LM types)
            keep the padded path. A runtime switch: :meth:`to_dict` writes
            it only when off (configs saved before it existed, and their fingerprints, are unchanged)
            and the embedder's fingerprint ignores it.
        moe_dispatch: how an MoE layer runs its aspect experts on the tokens routed to them (sorted by
            expert once in every mode): ``auto`` (a grouped GEMM, ``torch.nn.functional.grouped_mm``,
            where it runs and is right, forward and backward, for the device and dtype — checked once
            per process, see :func:`moon.model.moe.grouped_mm_works` — else one matmul per expert),
            ``loop`` (one matmul per expert) or ``grouped_mm`` (an error where it is not usable). Same
            routing and the same vectors up to float rounding; a runtime switch like ``packed``:
            written by :meth:`to_dict` only when not ``auto``, ignored by the fingerprint.
        graft: a :class:`GraftConfig` for the graft family (image encoder → projector → causal LM);
            ``None`` for the Qwen-VL family. ``min_pixels``/``max_pixels`` apply to Qwen-VL only.
    """

    backbone: str = "moon-tiny"
    seed: int = 0
    pooling: str = "mean"
    pooling_image_weight: float = 0.5
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
    center: bool = False
    precision: str = "fp32"
    packed: bool = True
    moe_dispatch: str = "auto"
    graft: GraftConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.graft is not None and not isinstance(self.graft, GraftConfig):
            self.graft = GraftConfig.from_dict(self.graft)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field and value."""
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if not 0.0 < self.pooling_image_weight < 1.0:
            raise ConfigError(f"pooling_image_weight={self.pooling_image_weight}: must be between 0 and 1 (exclusive)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r}: expected auto, fp32 or bf16")
        if not isinstance(self.packed, bool):
            raise ConfigError(f"packed={self.packed!r}: expected true or false")
        if self.moe_dispatch not in MOE_DISPATCHES:
            raise ConfigError(f"moe_dispatch={self.moe_dispatch!r}: expected one of {', '.join(MOE_DISPATCHES)}")
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
        data = dataclasses.asdict(self)
        if data["packed"] is True:  # the default: left out, so older configs and fingerprints stay as they were
            del data["packed"]
        if data["moe_dispatch"] == "auto":  # likewise
            del data["moe_dispatch"]
        if data["pooling_image_weight"] == 0.5 and data["pooling"] != "modality":  # unused: left out, as above
            del data["pooling_image_weight"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoonConfig:
        """Build from a dict; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MoonConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **overrides: Any) -> MoonConfig:
        """A copy with ``overrides`` applied (unknown names raise :class:`ConfigError`); a ``graft``
        dict is merged into the current graft config field by field."""
        data = self.to_dict()
        graft = overrides.get("graft")
        if isinstance(graft, dict) and isinstance(data.get("graft"), dict):
            overrides = {**overrides, "graft": {**data["graft"], **graft}}  # graft fields merge
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


class Preset(NamedTuple):
    """A named starting point: ``backbone`` is the random-init Qwen-VL config dict (``None`` for
    graft presets, whose parts are named in ``overrides["graft"]``), ``overrides`` the MoonConfig fields."""

    backbone: dict[str, Any] | None
    overrides: dict[str, Any]
    family: str = "qwen-vl"
    description: str = ""


#: a tiny random Qwen2 decoder for the graft used by tests (the offline Qwen2 tokenizer's vocabulary)
_TINY_QWEN2_LM = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

#: preset name → :class:`Preset`
PRESETS: dict[str, Preset] = {
    "moon-tiny": Preset(
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
        description="Qwen2.5-VL architecture, 2 layers × 64, random init (tests)",
    ),
    "moon-small": Preset(
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
        description="Qwen2.5-VL architecture, 4 layers × 256, random init (the from-scratch reference)",
    ),
    # The Qwen2.5-VL-3B shape (random init, for GPU benchmarks). Upcycling all 36 layers into
    # 1 + 4 experts would make a ~12B model, so the preset upcycles the last 4 layers only.
    "moon-3b": Preset(
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
        description="the Qwen2.5-VL-3B shape, random init (GPU benchmarks; real weights: a directory or hub id)",
    ),
    # Graft presets: real pretrained parts that install offline (`moon assets list`). What they keep
    # and why (tokens per image, kept layers, MoE layers) is measured in docs/model.md.
    "moon-smol": Preset(
        None,
        {
            "graft": {"lm": "asset:smollm2-135m", "image_encoder": "efficientnet-lite0", "image_tokens": 4,
                      "keep_layers": 6},
            "moe_layers": [-3, -2, -1],
            "max_images": 2,
            "max_text_tokens": 64,
            "precision": "auto",
            "center": True,
        },
        family="graft",
        description="EfficientNet-Lite0 + SmolLM2-135M (first 6 of 30 layers), pretrained; the CPU demo model",
    ),
    "moon-qwen0.5b": Preset(
        None,
        {
            "graft": {"lm": "asset:qwen2.5-0.5b", "image_encoder": "efficientnet-lite0", "image_tokens": 9},
            "moe_layers": [-8, -7, -6, -5, -4, -3, -2, -1],
            "max_text_tokens": 256,
            "precision": "auto",
            "center": True,
        },
        family="graft",
        description="EfficientNet-Lite0 + Qwen2.5-0.5B (24 layers), pretrained; opt-in asset, for a GPU",
    ),
    "moon-graft-tiny": Preset(
        None,
        {
            "graft": {"lm": "random", "lm_config": _TINY_QWEN2_LM, "tokenizer": "qwen2-offline",
                      "image_encoder": "tiny-cnn", "image_size": 64, "image_tokens": 4},
            "max_text_tokens": 128,
        },
        family="graft",
        description="a tiny random graft (tiny CNN + 2-layer Qwen2 decoder; tests, no asset needed)",
    ),
}  # fmt: skip
