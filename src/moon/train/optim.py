"""AdamW with decoupled weight decay (none on biases/norms/scalars) and a warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch

from moon.train.config import OptimConfig


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; tensors with fewer than 2 dims get no weight decay."""
    decay = [p for _, p in named_params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


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
