"""The families of models MOON knows: one table, each family with its loader and its policy.

A *family* is a kind of model (``moon``, ``two-tower``, ``random`` …). Its :class:`Family` entry says
how to load it and what may be done with it:

* ``trainable``: ``moon train`` can train it (:class:`~moon.models.TrainableEmbedder`);
* ``fresh``: the bare name builds a seeded model in code, from nothing but installed assets, so an
  index manifest (a data file) may name it;
* ``seed_arg``: ``family:INT`` is a seed (``random:3``), as safe as the bare name;
* ``preset_arg``: ``family:PRESET`` names a MOON preset whose parts it starts from (``two-tower:moon-smol``);
* ``saved``: its ``save_pretrained`` writes ``embedder.json`` + safetensors, so a saved directory
  (``DIR`` or ``family:DIR``) loads without running code and a manifest may name one;
* ``remote_code``: its checkpoints carry their own Python code, which runs only with the user's
  explicit ``--trust-remote-code`` (:func:`moon.models.load_embedder`'s ``trust_remote_code``).

The built-in families are listed here with their loaders as ``"module:function"`` (imported on first
use, so that ``import moon`` stays cheap); plug-ins add theirs with :func:`register_family`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moon.errors import ConfigError

Loader = Callable[..., Any]


@dataclass(frozen=True)
class Family:
    """One family of models: ``load(arg, **overrides)`` returns an embedder (``arg`` is the part of
    the spec after ``family:``, a saved directory, or ``None``); the flags are its policy (see the
    module docstring)."""

    name: str
    load: Loader | str
    summary: str = ""
    trainable: bool = False
    fresh: bool = False
    seed_arg: bool = False
    preset_arg: bool = False
    saved: bool = False
    remote_code: bool = False

    def loader(self) -> Loader:
        if callable(self.load):
            return self.load
        module, _, attr = self.load.partition(":")
        return getattr(importlib.import_module(module), attr)


#: the family a spec that names none is handed to (a preset, a directory without ``embedder.json``, a hub id)
DEFAULT_FAMILY = "moon"

_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "moon",
            "moon.model.embedder:load_moon",
            "MOON: a generative MLLM (Qwen-VL or a grafted small LM + image encoder) with guided MoE",
            trainable=True,
            fresh=True,
            saved=True,
        ),
        Family(
            "random",
            "moon.models.baselines.chance:load_random",
            "content-blind unit vectors: the chance floor",
            fresh=True,
            seed_arg=True,
        ),
        Family(
            "dual-encoder",
            "moon.models.baselines.dual_encoder:load_dual_encoder",
            "CLIP-style ViT + byte-level text transformer, from scratch",
            trainable=True,
            fresh=True,
            saved=True,
        ),
        Family(
            "pretrained-towers",
            "moon.models.baselines.pretrained_towers:load_pretrained_towers",
            "frozen EfficientNet-Lite0 + MiniLM with trained heads",
            trainable=True,
            fresh=True,
            saved=True,
        ),
        Family(
            "two-tower",
            "moon.models.baselines.two_tower:load_two_tower",
            "CLIP-style two towers from a MOON graft preset's pretrained parts",
            trainable=True,
            fresh=True,
            preset_arg=True,
            saved=True,
        ),
        Family(
            "open-clip",
            "moon.models.baselines.external:load_open_clip",
            "open_clip / SigLIP checkpoints you have (open-clip:ARCH[@PRETRAINED])",
        ),
        Family(
            "gme",
            "moon.models.baselines.external:load_gme",
            "GME-Qwen2-VL checkpoints you have (gme:DIR; their code runs only with --trust-remote-code)",
            remote_code=True,
        ),
    )
}


def register_family(family: Family) -> None:
    """Add (or replace) a family: ``moon.load_embedder("name[:arg]")`` then calls its loader."""
    if not family.name or ":" in family.name:
        raise ConfigError(f"family name {family.name!r}: must be non-empty and contain no ':'")
    _FAMILIES[family.name] = family


def unregister_family(name: str) -> None:
    """Remove a family added with :func:`register_family` (tests, plug-ins being unloaded)."""
    _FAMILIES.pop(name, None)


def is_family(name: str) -> bool:
    return name in _FAMILIES


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name``; an unknown name is a one-line :class:`ConfigError`."""
    family = _FAMILIES.get(name)
    if family is None:
        raise ConfigError(f"unknown embedder family {name!r}; known: {', '.join(families())}")
    return family


def families() -> list[str]:
    """The names of all families, sorted."""
    return sorted(_FAMILIES)


def preset_names() -> frozenset[str]:
    """MOON's preset names (``moon-tiny``, ``moon-smol`` …), which the default family builds."""
    from moon.model.config import PRESETS

    return frozenset(PRESETS)
