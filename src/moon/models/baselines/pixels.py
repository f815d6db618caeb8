"""Image references → fixed-size float tensors for the baselines' image towers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from moon.data.images import load_image
from moon.data.records import ImageRef


def image_tensor(ref: ImageRef, size: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """One image (path or PIL) → ``(3, size, size)`` float32, ``(x/255 - mean) / std`` (safe loader, bicubic resize)."""
    img = load_image(ref).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy((arr - mean) / std).permute(2, 0, 1).contiguous()


def images_tensor(refs: Sequence[ImageRef], size: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Several images → ``(n, 3, size, size)`` (``(0, 3, size, size)`` when there are none)."""
    if not refs:
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    return torch.stack([image_tensor(r, size, mean, std) for r in refs])
