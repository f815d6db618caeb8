"""Parse a Qwen-VL grounding answer into a pixel box of the original image.

Answers come in several shapes, all handled here:

* JSON (Qwen2.5-VL's default): ``[{"bbox_2d": [x1, y1, x2, y2], "label": "shoe"}]``, a bare object,
  ``{"bbox": [...]}``, often inside a fenced json code block, sometimes with trailing prose;
* special tokens (Qwen2-VL): ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``;
* a bare list of four numbers.

Coordinates depend on the model family (:data:`COORDINATE_FRAMES`): Qwen2.5-VL answers in absolute
pixels of the *resized* image it saw, Qwen2-VL and Qwen3-VL in 0–1000 relative units. The parsed box
is scaled to the original image, clamped and validated; anything else gives ``None``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from moon.errors import ConfigError
from moon.regions.base import BoxXYXY, clamp_box

#: model family → coordinate frame of its answers ("absolute" pixels of the model input, or "relative1000").
COORDINATE_FRAMES = {
    "qwen2-vl": "relative1000",
    "qwen2.5-vl": "absolute",
    "qwen2_5_vl": "absolute",
    "qwen3-vl": "relative1000",
}

_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_BOX_TOKENS = re.compile(
    rf"<\|box_start\|>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*<\|box_end\|>"
)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_FOUR = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d")


def coordinate_frame(family: str) -> str:
    """The coordinate frame (``absolute`` or ``relative1000``) of a model family or a frame name."""
    key = family.lower()
    if key in ("absolute", "relative1000"):
        return key
    if key not in COORDINATE_FRAMES:
        raise ConfigError(f"unknown model family {family!r} (known: {', '.join(sorted(COORDINATE_FRAMES))})")
    return COORDINATE_FRAMES[key]


def _four_numbers(value: Any) -> list[float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 4:
        try:
            nums = [float(v) for v in value]
        except (TypeError, ValueError):
            return None
        return nums if all(math.isfinite(v) for v in nums) else None
    return None


def _from_json_obj(obj: Any) -> list[float] | None:
    if isinstance(obj, dict):
        for key in _BOX_KEYS:
            if key in obj:
                return _four_numbers(obj[key])
        return None
    if isinstance(obj, list):
        direct = _four_numbers(obj)
        if direct is not None:
            return direct
        for item in obj:
            found = _from_json_obj(item)
            if found is not None:
                return found
    return None


def _json_candidates(text: str) -> list[str]:
    cands = [m.group(1) for m in _FENCE.finditer(text)]
    for opener, closer in (("[", "]"), ("{", "}")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            cands.append(text[start : end + 1])
    cands.append(text)
    return cands


def extract_raw_box(answer: str) -> list[float] | None:
    """The four numbers of the first box in an answer, in the answer's own frame (no scaling)."""
    if not isinstance(answer, str) or not answer.strip():
        return None
    m = _BOX_TOKENS.search(answer)
    if m:
        return _four_numbers([m.group(i) for i in range(1, 5)])
    for cand in _json_candidates(answer):
        try:
            obj = json.loads(cand.strip())
        except (json.JSONDecodeError, ValueError):
            continue
        found = _from_json_obj(obj)
        if found is not None:
            return found
    m = _FOUR.search(answer)
    if m:
        return _four_numbers([m.group(i) for i in range(1, 5)])
    return None


def parse_grounding_answer(
    answer: str,
    image_size: tuple[int, int],
    *,
    frame: str = "absolute",
    input_size: tuple[int, int] | None = None,
    min_side: float = 1.0,
) -> BoxXYXY | None:
    """Turn a model answer into a box ``(x0, y0, x1, y1)`` in pixels of the original image.

    Args:
        answer: the generated text.
        image_size: ``(width, height)`` of the original image.
        frame: ``absolute`` (pixels of the model input) or ``relative1000``, or a model family name.
        input_size: ``(width, height)`` the model saw (absolute frame); defaults to ``image_size``.
        min_side: reject boxes narrower or shorter than this many original pixels.

    Returns:
        The clamped box, or ``None`` if the answer holds no valid box (inverted, empty, outside).
    """
    frame = coordinate_frame(frame)
    raw = extract_raw_box(answer)
    if raw is None:
        return None
    x0, y0, x1, y1 = raw
    if x1 <= x0 or y1 <= y0:
        return None
    w, h = image_size
    if frame == "relative1000":
        sx, sy = w / 1000.0, h / 1000.0
    else:
        iw, ih = input_size or image_size
        sx, sy = w / float(iw), h / float(ih)
    box = clamp_box((x0 * sx, y0 * sy, x1 * sx, y1 * sy), image_size)
    if box is None or box[2] - box[0] < min_side or box[3] - box[1] < min_side:
        return None
    return box
