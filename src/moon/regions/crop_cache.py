"""Crops on disk, keyed by image content and detector: the same picture is never cropped twice.

Key = sha1(image bytes) + detector fingerprint + crop policy. A cached entry is a JPEG crop
``<dir>/<key>.jpg`` plus ``<dir>/<key>.json`` holding the detected box, score and the crop box
(``null`` when the policy kept the full image, in which case no JPEG exists).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from moon.regions.base import BoxXYXY
from moon.regions.crop_policy import CropPolicy


@dataclass(frozen=True)
class CropEntry:
    """A cached result: the detected ``box`` and ``score``, the padded ``crop_box`` (or ``None``), the crop file."""

    box: BoxXYXY
    score: float
    crop_box: BoxXYXY | None
    crop_path: Path | None


def crop_key(image_sha1: str, detector_fingerprint: str, policy: CropPolicy) -> str:
    """The cache key of one image under one detector and policy."""
    spec = json.dumps({"img": image_sha1, "det": detector_fingerprint, "policy": policy.as_dict()}, sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class CropCache:
    """A directory of crops and their detection records."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def get(self, key: str) -> CropEntry | None:
        meta = self.dir / f"{key}.json"
        if not meta.is_file():
            return None
        try:
            rec = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        crop = self.dir / f"{key}.jpg" if rec.get("crop_box") is not None else None
        if crop is not None and not crop.is_file():
            return None
        return CropEntry(
            tuple(rec["box"]), float(rec["score"]), tuple(rec["crop_box"]) if rec.get("crop_box") else None, crop
        )

    def put(
        self, key: str, box: BoxXYXY, score: float, crop_box: BoxXYXY | None, crop: Image.Image | None
    ) -> CropEntry:
        """Store a result (the JPEG first, the JSON last, both atomically)."""
        import io

        self.dir.mkdir(parents=True, exist_ok=True)
        crop_path = None
        if crop is not None and crop_box is not None:
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            crop_path = self.dir / f"{key}.jpg"
            _atomic_write_bytes(crop_path, buf.getvalue())
        rec = {
            "box": [float(v) for v in box],
            "score": float(score),
            "crop_box": [float(v) for v in crop_box] if crop_box else None,
        }
        _atomic_write_bytes(self.dir / f"{key}.json", json.dumps(rec, sort_keys=True).encode())
        return CropEntry(tuple(rec["box"]), rec["score"], crop_box, crop_path)
