"""Test doubles for the learned detector's heads and backbone."""

import torch
from torch import nn


class FixedHead(nn.Module):
    """Stands in for a BoxHead: one peaked cell, every cell predicting ``box`` (fractions)."""

    def __init__(self, box: tuple[float, float, float, float]):
        super().__init__()
        self.box = torch.tensor(box)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, cells = feats.shape[0], feats.shape[2] * feats.shape[3]
        logits = torch.zeros(n, cells)
        logits[:, 5] = 10.0
        return logits, self.box.expand(n, cells, 4)


def zero_features(x: torch.Tensor) -> torch.Tensor:
    """A backbone stand-in: ``(n, 3, S, S)`` images → ``(n, 4, S/16, S/16)`` zeros."""
    return torch.zeros(x.shape[0], 4, x.shape[-1] // 16, x.shape[-1] // 16)
