"""Pooling of the last hidden states into one vector per sequence."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """``(B, L, H)`` hidden states + ``(B, L)`` mask (1 = token) → ``(B, H)``.

    ``mean``: masked mean over the real tokens (the paper's); ``last``: the last real token
    (sequences are right-padded, so its index is ``length - 1``).
    """
    if mode == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if mode == "last":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}")
