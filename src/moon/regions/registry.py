"""Build a detector by name: ``load_detector("saliency" | "learned" | "grounding", model=...)``."""

from __future__ import annotations

import os

from moon.errors import ConfigError
from moon.regions.base import Detector

DETECTORS = ("grounding", "learned", "saliency")


def load_detector(name: str, model: str | os.PathLike | None = None, **kwargs) -> Detector:
    """A ready detector. ``model`` is the trained head directory (``learned``) or the Qwen-VL path/hub id
    (``grounding``); ``saliency`` takes none."""
    if name == "saliency":
        from moon.regions.saliency import SaliencyDetector

        return SaliencyDetector(**kwargs)
    if name == "learned":
        if model is None:
            raise ConfigError("the learned detector needs --model MODEL_DIR (train one with `moon detect train`)")
        from moon.regions.learned import LearnedDetector

        return LearnedDetector.load(model)
    if name == "grounding":
        if model is None:
            raise ConfigError("the grounding detector needs --model (a Qwen2.5-VL directory or hub id)")
        from moon.regions.grounding import GroundingDetector

        return GroundingDetector(model, **kwargs)
    raise ConfigError(f"unknown detector {name!r} (choose one of {', '.join(DETECTORS)})")
