"""Contrastive losses: InfoNCE over a masked candidate pool, with a fixed or learnable temperature."""

from __future__ import annotations

import math

import torch
from torch import nn


def info_nce(logits: torch.Tensor, allowed: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per-row InfoNCE: ``-log softmax(logits over allowed columns)[positive]``.

    Args:
        logits: ``(n, m)`` similarities already divided by the temperature.
        allowed: ``(n, m)`` bool; the columns each row may use (its positive must be allowed).
        positive: ``(n,)`` long, the positive column of each row.

    Returns:
        ``(n,)`` losses.
    """
    masked = logits.masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(masked, dim=1) - logits.gather(1, positive[:, None]).squeeze(1)


class ContrastiveLoss(nn.Module):
    """Holds the temperature τ (fixed, or learnable as ``log(1/τ)`` clamped to τ ≥ 0.01).

    ``scale`` is ``1/τ``; the trainer multiplies cosine similarities by it.
    """

    def __init__(self, temperature: float = 0.05, learnable: bool = False, min_temperature: float = 0.01):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)
        self.max_log_scale = math.log(1.0 / min_temperature)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale.detach())

    def forward(
        self, queries: torch.Tensor, candidates: torch.Tensor, allowed: torch.Tensor, positive: torch.Tensor
    ) -> torch.Tensor:
        """``(n, d)`` queries against ``(m, d)`` candidates → ``(n,)`` InfoNCE losses."""
        return info_nce(queries @ candidates.T * self.scale, allowed, positive)
