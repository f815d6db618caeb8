"""AdamW with decoupled weight decay (none on biases/norms/scalars) and a warm-up + cosine schedule."""

from __future__ import annotations

import math
import re

import torch

from moon.train.config import OptimConfig


def lr_multiplier(name: str, lr_scale: dict[str, float]) -> float:
    """The factor ``optim.lr_scale`` gives parameter ``name``: the first pattern (a regular
    expression searched in the name) that matches, else 1."""
    for pattern, factor in lr_scale.items():
        if re.search(pattern, name):
            return float(factor)
    return 1.0


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; tensors with fewer than 2 dims get no weight decay;
    ``config.lr_scale`` multiplies the learning rate of the parameters whose names match (e.g. a
    new projector learns faster than the pretrained LM it feeds)."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in named_params:
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, lr_multiplier(name, config.lr_scale)), []).append(p)
    return torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": config.weight_decay if decay else 0.0, "lr": config.lr * scale}
            for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
        ],
        lr=config.lr,
    )


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up from
    ``1/(warmup+1)`` to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total=config.steps, warmup=config.warmup_steps, min_ratio=config.min_lr_ratio),
    )
