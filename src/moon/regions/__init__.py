"""Core product region detection: three detectors behind one interface, a crop policy and a crop cache.

``detect(image, title) -> list[Detection]`` (box in pixels + score) is offered by
:class:`SaliencyDetector` (classical floor), :class:`LearnedDetector` (head on EfficientNet-Lite0)
and :class:`GroundingDetector` (prompted Qwen-VL, the paper's). :func:`run_detection` crops a whole
store resumably, :func:`evaluate_detector` scores a detector per image kind. Torch-based pieces are
imported on first use.
"""

from __future__ import annotations

from typing import Any

from moon.regions.base import Detection, Detector, clamp_box, full_image_box
from moon.regions.crop_cache import CropCache, crop_key
from moon.regions.crop_policy import CropPolicy, crop_image
from moon.regions.grounding_parse import coordinate_frame, extract_raw_box, parse_grounding_answer
from moon.regions.registry import DETECTORS, load_detector
from moon.regions.saliency import SaliencyDetector

_LAZY = {
    "LearnedDetector": "moon.regions.learned",
    "GroundingDetector": "moon.regions.grounding",
    "train_learned": "moon.regions.training",
    "TrainReport": "moon.regions.training",
    "evaluate_detector": "moon.regions.evaluate",
    "EvalReport": "moon.regions.evaluate",
    "run_detection": "moon.regions.run",
    "RunReport": "moon.regions.run",
    "write_gallery": "moon.regions.gallery",
}

__all__ = [
    "DETECTORS",
    "CropCache",
    "CropPolicy",
    "Detection",
    "Detector",
    "SaliencyDetector",
    "clamp_box",
    "coordinate_frame",
    "crop_image",
    "crop_key",
    "extract_raw_box",
    "full_image_box",
    "load_detector",
    "parse_grounding_answer",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moon.regions' has no attribute {name!r}")
