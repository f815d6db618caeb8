"""Which crop to add next to an image: pad the detected box, skip useless crops, fall back.

A crop is only worth adding when it removes something: a box covering almost the whole image adds
nothing, and a tiny box is more likely a wrong answer than the product. In both cases (and when the
detector found nothing) the policy answers ``None``: the original image alone is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image

from moon.errors import ConfigError
from moon.regions.base import BoxXYXY, Detection, clamp_box


@dataclass(frozen=True)
class CropPolicy:
    """Padding and skip rules.

    Attributes:
        pad: grow the box by this fraction of its width/height on each side (0.05 = 5 %).
        max_area: skip crops whose padded box covers more than this fraction of the image.
        min_area: skip crops whose (unpadded) box covers less than this fraction of the image.
        min_side: skip crops whose (unpadded) box is narrower or shorter than this many pixels.
        min_score: ignore detections scoring below this.
    """

    pad: float = 0.05
    max_area: float = 0.85
    min_area: float = 0.005
    min_side: int = 8
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.pad <= 1.0:
            raise ConfigError(f"crop pad {self.pad} must lie in [0, 1]")
        if not 0.0 < self.max_area <= 1.0:
            raise ConfigError(f"crop max_area {self.max_area} must lie in (0, 1]")
        if not 0.0 <= self.min_area < self.max_area:
            raise ConfigError(f"crop min_area {self.min_area} must lie in [0, max_area={self.max_area})")
        if self.min_side < 1:
            raise ConfigError(f"crop min_side {self.min_side} must be at least 1")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def pad_box(self, box: BoxXYXY, size: tuple[int, int]) -> BoxXYXY:
        """``box`` grown by ``pad`` on each side and clipped to an image of ``size = (w, h)``."""
        x0, y0, x1, y1 = box
        dx, dy = (x1 - x0) * self.pad, (y1 - y0) * self.pad
        out = clamp_box((x0 - dx, y0 - dy, x1 + dx, y1 + dy), size)
        return out if out is not None else box

    def choose(self, detections: list[Detection], size: tuple[int, int]) -> BoxXYXY | None:
        """The integer pixel box to crop (padded), or ``None`` to use the full image only."""
        w, h = size
        for det in detections:
            if det.score < self.min_score:
                continue
            box = clamp_box(det.box, size)
            if box is None:
                continue
            bw, bh = box[2] - box[0], box[3] - box[1]
            if bw < self.min_side or bh < self.min_side or bw * bh < self.min_area * w * h:
                return None
            x0, y0, x1, y1 = self.pad_box(box, size)
            x0, y0 = int(x0), int(y0)  # floor of non-negatives
            x1, y1 = min(w, int(-(-x1 // 1))), min(h, int(-(-y1 // 1)))
            if (x1 - x0) * (y1 - y0) > self.max_area * w * h:
                return None
            return (float(x0), float(y0), float(x1), float(y1))
        return None


def crop_image(image: Image.Image, box: BoxXYXY) -> Image.Image:
    """The pixels of ``image`` inside an integer ``box`` (x0, y0, x1, y1)."""
    return image.crop(tuple(int(round(v)) for v in box))
