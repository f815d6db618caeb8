"""The temporal negatives: a FIFO queue of detached product vectors from earlier steps.

Each entry remembers the catalog index of its product (so the false-negative guard can drop it
for queries that bought that product or a duplicate) and the step it was computed at (so entries
older than ``max_age`` steps are never used: the model has moved on since).
"""

from __future__ import annotations

from typing import Any

import torch


class MemoryQueue:
    """A ring buffer of at most ``size`` product vectors.

    Args:
        size: capacity (0 disables the queue).
        dim: vector dimension.
        max_age: entries computed more than ``max_age`` steps before the current step are expired.
    """

    def __init__(self, size: int, dim: int, max_age: int, device: torch.device | str = "cpu"):
        self.size = size
        self.dim = dim
        self.max_age = max_age
        self.vectors = torch.zeros(size, dim, device=device)
        self.products = torch.full((size,), -1, dtype=torch.long)
        self.steps = torch.full((size,), -1, dtype=torch.long)
        self.ptr = 0

    def __len__(self) -> int:
        return int((self.products >= 0).sum())

    def push(self, vectors: torch.Tensor, products: torch.Tensor, step: int) -> None:
        """Add ``(n, dim)`` vectors (detached) of catalog products ``(n,)`` computed at ``step``.

        When ``n > size`` only the last ``size`` are kept.
        """
        if self.size == 0:
            return
        vectors = vectors.detach().to(self.vectors.device, self.vectors.dtype)
        products = products.to(torch.long).cpu()
        if len(vectors) > self.size:
            vectors, products = vectors[-self.size :], products[-self.size :]
        n = len(vectors)
        idx = (torch.arange(n) + self.ptr) % self.size
        self.vectors[idx.to(self.vectors.device)] = vectors
        self.products[idx] = products
        self.steps[idx] = step
        self.ptr = int((self.ptr + n) % self.size)

    def live(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries usable at ``step``: ``(vectors (m, dim), products (m,), ages (m,))``.

        Expired entries (age > ``max_age``) are cleared as a side effect.
        """
        if self.size == 0:
            return self.vectors[:0], self.products[:0], self.steps[:0]
        ages = step - self.steps
        expired = (self.products >= 0) & (ages > self.max_age)
        self.products[expired] = -1
        self.steps[expired] = -1
        keep = (self.products >= 0).nonzero().squeeze(1)
        return self.vectors[keep.to(self.vectors.device)], self.products[keep], ages[keep]

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "dim": self.dim,
            "max_age": self.max_age,
            "vectors": self.vectors.cpu(),
            "products": self.products.clone(),
            "steps": self.steps.clone(),
            "ptr": self.ptr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size or int(state["dim"]) != self.dim:
            raise ValueError(
                f"queue shape differs: saved {state['size']}×{state['dim']}, configured {self.size}×{self.dim}"
            )
        self.vectors.copy_(state["vectors"].to(self.vectors.device))
        self.products.copy_(state["products"])
        self.steps.copy_(state["steps"])
        self.ptr = int(state["ptr"])
