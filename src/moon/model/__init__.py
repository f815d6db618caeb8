"""The MOON model: Qwen-VL backbones, input building with aspect tags, guided MoE, pooling.

``MoonEmbedder.from_pretrained("moon-tiny")`` gives a ready embedder (see :mod:`moon.model.embedder`).
"""

from moon.model.config import ASPECTS, EXPERTS, MOE_MODES, PRESETS, MoonConfig
from moon.model.embedder import MoonEmbedder
from moon.model.inputs import EncodedInput, TruncationWarning
from moon.model.moe import GuidedMoE

__all__ = [
    "ASPECTS",
    "EXPERTS",
    "MOE_MODES",
    "PRESETS",
    "EncodedInput",
    "GuidedMoE",
    "MoonConfig",
    "MoonEmbedder",
    "TruncationWarning",
]
