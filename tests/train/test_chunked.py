"""Done-criterion 2: chunked (GradCache) encoding gives the unchunked gradients."""

from __future__ import annotations

import math

import pytest
import torch

from moon.train.chunked import forward_backward
from moon.train.losses import info_nce


@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_chunked_gradients_equal_unchunked(small_store, chunk_size):
    from helpers import gradients_after_two_steps, max_relative_difference

    ref_losses, ref = gradients_after_two_steps(small_store, chunk_size=None)
    losses, got = gradients_after_two_steps(small_store, chunk_size=chunk_size)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert max_relative_difference(got, ref) <= 1e-5


def test_chunk_replay_reproduces_dropout(small_store):
    """With dropout on, every re-embedded chunk equals its first (no-grad) pass: RNG replayed."""
    from toy_embedder import ToyEmbedder

    torch.manual_seed(0)
    model = ToyEmbedder(dropout=0.5)
    model.train()
    items = [[i % 50, (3 * i) % 50, 7] for i in range(10)]

    def loss_fn(q, p):
        return (q @ p.T).logsumexp(1).sum(), {}

    torch.manual_seed(1)
    forward_backward(model, items, items, loss_fn, chunk_size=3, check_replay=True)
    grads_first = [p.grad.clone() for p in model.parameters()]
    state_after = torch.get_rng_state()
    # the RNG stream after a chunked step continues from where the first pass left it
    torch.manual_seed(1)
    with torch.no_grad():
        for start in range(0, 10, 3):
            model(model.collate(items[start : start + 3]))
        for start in range(0, 10, 3):
            model(model.collate(items[start : start + 3]))
    assert torch.equal(state_after, torch.get_rng_state())
    assert all(torch.isfinite(g).all() for g in grads_first)


def test_info_nce_known_answer():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    allowed = torch.tensor([[True, True, False], [True, True, True]])
    positive = torch.tensor([0, 2])
    got = info_nce(logits, allowed, positive)
    want0 = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0)))
    want1 = -(3.0 - math.log(2 * math.exp(0.5) + math.exp(3.0)))
    assert got.tolist() == pytest.approx([want0, want1], rel=1e-6)
