"""The one detector interface: ``detect(image, title) -> list[Detection]``.

A :class:`Detection` is a box in pixels of the image it was asked about, ``(x0, y0, x1, y1)`` with
x0/y0 inclusive and x1/y1 exclusive (the convention of :class:`moon.data.Box`), plus a score in
[0, 1]. Detectors return their candidates best first; an empty list means "nothing found".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

BoxXYXY = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One candidate core region: ``box`` in pixels ``(x0, y0, x1, y1)`` and a ``score`` in [0, 1]."""

    box: BoxXYXY
    score: float = 1.0


@runtime_checkable
class Detector(Protocol):
    """What every core-region detector offers.

    ``name`` is the box ``source`` written to ``boxes.parquet``; ``fingerprint()`` is a stable hash
    of the detector's weights and settings (crop caches are keyed by it).
    """

    name: str

    def fingerprint(self) -> str: ...

    def detect(self, image: Image.Image, title: str | None = None) -> list[Detection]:
        """Boxes of the product the title describes on an RGB image, best first."""
        ...


def full_image_box(size: tuple[int, int]) -> BoxXYXY:
    """The box covering a whole image of ``size = (width, height)``."""
    return (0.0, 0.0, float(size[0]), float(size[1]))


def clamp_box(box: BoxXYXY, size: tuple[int, int]) -> BoxXYXY | None:
    """Clip a box to the image; ``None`` when nothing of positive area is left."""
    w, h = size
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, w)), max(0.0, min(x1, w))
    y0, y1 = max(0.0, min(y0, h)), max(0.0, min(y1, h))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return (x0, y0, x1, y1)
