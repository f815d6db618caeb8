"""Fusing a record's image vectors with its text vector (the dual-flow baselines' many-to-one rule)."""

from __future__ import annotations

import torch


def fuse(
    image_vecs: torch.Tensor, owner: torch.Tensor, text_vecs: torch.Tensor, has_text: torch.Tensor, image_weight: float
) -> torch.Tensor:
    """Fuse each record's image vectors with its text vector → ``(B, d)`` L2-normalised.

    Args:
        image_vecs: ``(N, d)`` unit vectors of all images of the batch; ``owner`` ``(N,)`` their record index.
        text_vecs: ``(B, d)`` unit text vectors; ``has_text`` ``(B,)`` bool.
        image_weight: w in ``normalize(w · mean(images) + (1 − w) · text)``; a record without images
            (or without text) uses the other side alone.
    """
    b, d = text_vecs.shape
    img_sum = torch.zeros((b, d), dtype=text_vecs.dtype, device=text_vecs.device).index_add(0, owner, image_vecs)
    counts = torch.zeros(b, dtype=text_vecs.dtype, device=text_vecs.device).index_add(
        0, owner, torch.ones_like(owner, dtype=text_vecs.dtype)
    )
    has_img = counts > 0
    img_mean = img_sum / counts.clamp(min=1).unsqueeze(1)
    w_img = torch.where(has_img, torch.where(has_text, image_weight, 1.0), 0.0).to(text_vecs.dtype).unsqueeze(1)
    w_txt = torch.where(has_text, torch.where(has_img, 1.0 - image_weight, 1.0), 0.0).to(text_vecs.dtype).unsqueeze(1)
    fused = w_img * img_mean + w_txt * text_vecs
    return torch.nn.functional.normalize(fused, dim=-1)
