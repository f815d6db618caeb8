"""A byte-level tokenizer for the dual-encoder's text tower: UTF-8 bytes + 3 specials, no files needed.

Ids 0–255 are bytes; :data:`PAD`, :data:`CLS`, :data:`EOS` follow. Works for any script (Chinese
titles become 3 bytes per character), which is why it was chosen over a learned vocabulary.
"""

from __future__ import annotations

import torch

PAD, CLS, EOS = 256, 257, 258
VOCAB_SIZE = 259


def encode_text(text: str, max_len: int) -> torch.Tensor:
    """``text`` → ``(L,)`` int64 ids ``[CLS, bytes…, EOS]`` with L ≤ ``max_len`` (bytes truncated)."""
    data = list(text.encode("utf-8"))[: max(max_len - 2, 0)]
    return torch.tensor([CLS, *data, EOS], dtype=torch.long)


def pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences → ``(ids (B, L), mask (B, L) bool, True on real tokens)``."""
    length = max((len(s) for s in seqs), default=1)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask
