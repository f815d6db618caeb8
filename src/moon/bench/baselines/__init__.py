"""Baselines scored by the same harness as MOON; importing this module registers their families.

==================== =================================================== ==========
family               what                                                trainable
==================== =================================================== ==========
``random``           content-blind unit vectors: the chance floor        no
``dual-encoder``     CLIP-style ViT + byte-level text transformer        yes (all)
``pretrained-towers`` frozen EfficientNet-Lite0 + MiniLM, trained heads   yes (heads)
``two-tower``        CLIP-style, from a MOON graft preset's pretrained    yes (LM + image head)
                     parts (image encoder + the same causal LM)
``open-clip``        open_clip / SigLIP checkpoints users have           no
``gme``              GME-Qwen2-VL checkpoints users have                 no
==================== =================================================== ==========

``load_embedder("dual-encoder")`` gives a fresh seeded model, ``load_embedder("dual-encoder:DIR")``
(or ``load_embedder(DIR)``) a saved one; keyword overrides change config fields.
"""

from __future__ import annotations

from typing import Any

from moon.embedders import Embedder, register_embedder
from moon.errors import ConfigError


def _random(arg: str | None = None, **overrides: Any) -> Embedder:
    from moon.bench.baselines.chance import load_random

    return load_random(arg, **overrides)


def _dual_encoder(arg: str | None = None, **overrides: Any) -> Embedder:
    from moon.bench.baselines.dual_encoder import load_dual_encoder

    return load_dual_encoder(arg, **overrides)


def _pretrained_towers(arg: str | None = None, **overrides: Any) -> Embedder:
    from moon.bench.baselines.pretrained_towers import load_pretrained_towers

    return load_pretrained_towers(arg, **overrides)


def _two_tower(arg: str | None = None, **overrides: Any) -> Embedder:
    from moon.bench.baselines.two_tower import load_two_tower

    return load_two_tower(arg, **overrides)


def _open_clip(arg: str | None = None, **overrides: Any) -> Embedder:
    from moon.bench.baselines.external import load_open_clip

    return load_open_clip(arg, **overrides)


def _gme(arg: str | None = None, **overrides: Any) -> Embedder:
    from moon.bench.baselines.external import load_gme

    return load_gme(arg, **overrides)


register_embedder("random", _random)
register_embedder("dual-encoder", _dual_encoder)
register_embedder("pretrained-towers", _pretrained_towers)
register_embedder("two-tower", _two_tower)
register_embedder("open-clip", _open_clip)
register_embedder("gme", _gme)

TRAINABLE = ("dual-encoder", "pretrained-towers", "two-tower")
_TRAINABLE_FACTORIES = {"dual-encoder": _dual_encoder, "pretrained-towers": _pretrained_towers, "two-tower": _two_tower}


def create_trainable(spec: str, **overrides: Any) -> Any:
    """A trainable baseline (``torch.nn.Module``) from ``"dual-encoder"``, ``"pretrained-towers"``,
    ``"two-tower"`` or ``"<family>:ARG"``, with config overrides (e.g. ``dim=128, seed=1``)."""
    family, _, arg = spec.partition(":")
    if family not in TRAINABLE:
        raise ConfigError(f"{spec!r}: trainable baselines are {', '.join(TRAINABLE)}")
    return _TRAINABLE_FACTORIES[family](arg or None, **overrides)


__all__ = ["TRAINABLE", "create_trainable"]
