"""Image encoders for the graft backbone family: a name in the config → an ``nn.Module``.

Every encoder maps ``(N, 3, S, S)`` normalised pixels to a feature map ``(N, D, h, w)``; the graft
pools that map to a few visual tokens. Registered names:

* ``efficientnet-lite0`` — ImageNet EfficientNet-Lite0 (asset ``efficientnet-lite0``), the
  1280-channel head features (7×7 at 224²), input ``(x/255 − 0.498) / 0.502``;
* ``tiny-cnn`` — a small random CNN (tests and smoke runs; no asset);
* ``hf:DIR_OR_HUB_ID`` — a transformers vision tower (``CLIPVisionModel``, ``SiglipVisionModel`` …)
  whose patch tokens are laid out as a square grid; mean/std come from its image-processor config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from moon.errors import ConfigError


class ImageEncoder(nn.Module):
    """Base class: ``preprocess(PIL) -> (3, S, S)`` and ``forward(pixels) -> (N, D, h, w)``.
    ``channels_last``: a convolutional network, faster with weights and pixels in that layout."""

    channels_last: bool = False
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image → ``(3, S, S)`` float32 (bicubic resize to a square, normalised)."""
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class EfficientNetLite0(ImageEncoder):
    channels_last = True
    feature_dim = 1280
    mean = (0.498, 0.498, 0.498)
    std = (0.502, 0.502, 0.502)

    def __init__(self, image_size: int = 224, pretrained: bool = True):
        super().__init__()
        from moon.assets import efficientnet_lite0

        self.image_size = image_size
        self.net = efficientnet_lite0(pretrained=pretrained)
        self.net.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels)


class TinyCNN(ImageEncoder):
    """Three strided convolutions (random init): ``(N, 3, S, S)`` → ``(N, 32, S/8, S/8)``."""

    channels_last = True
    feature_dim = 32

    def __init__(self, image_size: int = 64, pretrained: bool = False):
        super().__init__()
        self.image_size = image_size
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 32, 3, 2, 1)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


class HFVisionTower(ImageEncoder):
    """A transformers vision model's last hidden state, patch tokens as a square grid."""

    def __init__(self, source: str, image_size: int | None = None, pretrained: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from moon.model.backbone import hf_reason

        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"image encoder hf:{source}: not a loadable transformers vision model ({hf_reason(exc)})"
            ) from exc
        vision_cfg = getattr(config, "vision_config", config)
        if pretrained:
            try:
                model = AutoModel.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"image encoder hf:{source}: weights not loadable ({hf_reason(exc)})") from exc
        else:
            model = AutoModel.from_config(config)
        self.model = getattr(model, "vision_model", model)
        self.source_config = config
        self.feature_dim = int(vision_cfg.hidden_size)
        self.image_size = int(image_size or vision_cfg.image_size)
        self.mean, self.std = _processor_stats(source, self.mean, self.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=pixels).last_hidden_state  # (N, T, D)
        n = tokens.shape[1]
        side = math.isqrt(n)
        if side * side != n:  # a leading [CLS] token
            tokens, n = tokens[:, 1:], n - 1
            side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"image encoder: {n} patch tokens do not form a square grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    def save_config(self, directory: str | Path) -> None:
        """Write the tower's config and its mean/std, so that ``hf:directory`` rebuilds it."""
        self.source_config.save_pretrained(str(directory))
        stats = {"image_mean": list(self.mean), "image_std": list(self.std), "size": self.image_size}
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps(stats) + "\n", encoding="utf-8")


def _processor_stats(source: str, mean, std):
    cfg = Path(source) / "preprocessor_config.json"
    if cfg.is_file():
        from moon.data.safe_open import read_json
        from moon.errors import DataError

        try:  # bounded: a huge or deeply nested file is ignored like a missing one
            data = read_json(cfg, 1 << 20)
            return tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        except (DataError, ValueError, TypeError, AttributeError):
            pass
    return mean, std


def build_image_encoder(name: str, *, image_size: int | None = None, pretrained: bool = True) -> ImageEncoder:
    """The encoder registered as ``name`` (see the module docstring); ``pretrained=False`` builds
    the architecture only (the weights then come from a saved state dict)."""
    kwargs: dict[str, Any] = {"pretrained": pretrained}
    if image_size is not None:
        kwargs["image_size"] = image_size
    if name == "efficientnet-lite0":
        return EfficientNetLite0(**kwargs)
    if name == "tiny-cnn":
        return TinyCNN(**kwargs)
    if name.startswith("hf:") and len(name) > 3:
        return HFVisionTower(name[3:], **kwargs)
    raise ConfigError(f"unknown image encoder {name!r}; use efficientnet-lite0, tiny-cnn or hf:DIR_OR_HUB_ID")


__all__ = ["ImageEncoder", "build_image_encoder"]
