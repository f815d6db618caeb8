"""Pooling of the last hidden states into one vector per sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moon.model.config import ASPECTS

#: the aspect tags of visual tokens (everything else real is text: instruction, title, category,
#: attributes, query text)
VISUAL_ASPECTS = ("vision", "crop")


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: str = "mean",
    *,
    aspect_ids: torch.Tensor | None = None,
    image_weight: float = 0.5,
) -> torch.Tensor:
    """``(B, L, H)`` hidden states + ``(B, L)`` mask (1 = token) → ``(B, H)``.

    ``mean``: masked mean over the real tokens (the paper's); ``last``: the last real token
    (sequences are right-padded, so its index is ``length - 1``); ``modality``: the masked means of
    the visual tokens and of the text tokens (by ``aspect_ids``, ``(B, L)``), each L2-normalised, mixed
    as ``w · visual + (1 − w) · text`` with ``w = image_weight`` (a sequence with one side only takes
    that side alone), the late fusion of the dual-flow baselines inside one sequence.
    """
    if mode == "mean":
        return _masked_mean(hidden, attention_mask.bool())
    if mode == "last":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "modality":
        if aspect_ids is None:
            raise ValueError("pooling 'modality' needs the batch's aspect_ids")
        real = attention_mask.bool()
        tags = aspect_ids.to(hidden.device)
        visual = torch.zeros_like(real)
        for name in VISUAL_ASPECTS:
            visual |= tags == ASPECTS.index(name)
        visual &= real
        text = real & ~visual
        vis = F.normalize(_masked_mean(hidden, visual).float(), dim=-1)
        txt = F.normalize(_masked_mean(hidden, text).float(), dim=-1)
        has_v, has_t = visual.any(1), text.any(1)
        w_v = torch.where(has_v, torch.where(has_t, image_weight, 1.0), 0.0).unsqueeze(1)
        w_t = torch.where(has_t, torch.where(has_v, 1.0 - image_weight, 1.0), 0.0).unsqueeze(1)
        return (w_v * vis + w_t * txt).to(hidden.dtype)
    raise ValueError(f"unknown pooling {mode!r}")


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
