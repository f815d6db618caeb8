"""Attention backends of the packed path (``moon.model.packed``): the grouped SDPA on CPU, and the
wiring of a variable-length kernel (``cu_seqlens``, ``max_seqlen``, the causal flag, the scale),
tested with a pure-torch reference kernel injected as the backend, so no GPU is needed."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.utils.checkpoint

from moon.data import Query
from moon.model import MoonEmbedder
from moon.model import packed as packed_mod
from moon.model.packed import attention_backend, attention_backend_name, grouped_sdpa, varlen_kernel

CPU = torch.device("cpu")


def reference_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, scale):
    """Variable-length attention over ``cu_seqlens`` written out: per sequence, scores, mask, softmax."""
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.ndim == 1
    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0]
    assert max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    for a, b in zip(bounds, bounds[1:], strict=False):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (nh, n, d)
        scores = (qs @ ks.transpose(1, 2)) * scale
        if causal:
            n = b - a
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


@pytest.fixture
def backend(monkeypatch):
    """Set ``ATTENTION_BACKEND`` for one test (restored after)."""

    def set_backend(value):
        monkeypatch.setattr(packed_mod, "ATTENTION_BACKEND", value)

    return set_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_always_uses_the_grouped_sdpa(backend, dtype):
    for value in ("auto", "grouped_sdpa"):
        backend(value)
        assert attention_backend(CPU, dtype) is None
        assert attention_backend_name(CPU, dtype) == "grouped_sdpa"
    assert varlen_kernel(CPU, dtype) is None  # no kernel is even probed off CUDA
    backend("varlen")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        attention_backend(CPU, dtype)
    backend("flash")
    with pytest.raises(ValueError, match="expected one of"):
        attention_backend(CPU, dtype)


def test_an_injected_function_is_the_backend_on_any_device(backend):
    backend(reference_varlen)
    assert attention_backend(CPU, torch.float32) is reference_varlen
    assert attention_backend_name(CPU, torch.float32) == "varlen"


def test_the_kernel_check_accepts_a_right_kernel_and_rejects_wrong_ones():
    assert packed_mod._varlen_agrees(reference_varlen, CPU, torch.float32)

    def ignores_causal(q, k, v, cu, max_len, *, causal, scale):
        return reference_varlen(q, k, v, cu, max_len, causal=not causal, scale=scale)

    def ignores_scale(q, k, v, cu, max_len, *, causal, scale):
        return reference_varlen(q, k, v, cu, max_len, causal=causal, scale=q.shape[-1] ** -0.5)

    def one_sequence(q, k, v, cu, max_len, *, causal, scale):
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return reference_varlen(q, k, v, whole, q.shape[0], causal=causal, scale=scale)

    for wrong in (ignores_causal, ignores_scale, one_sequence):
        assert not packed_mod._varlen_agrees(wrong, CPU, torch.float32), wrong.__name__


def test_the_kernel_probe_survives_failures_and_checkpointing():
    """The probe back-propagates; the first packed forward may be inside gradient checkpointing, so
    the probe runs in a thread of its own and neither disturbs nor is disturbed by the caller."""

    def broken():
        raise ImportError("no such kernel")

    assert not packed_mod._probe("broken", broken, CPU, torch.float32)
    seen = []

    def layer(x):
        seen.append(
            packed_mod._in_own_thread(
                functools.partial(packed_mod._probe, "ref", lambda: reference_varlen, CPU, torch.float32)
            )
        )
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(x.grad, x.detach().cos())
    assert seen and all(seen)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_varlen_equals_grouped_sdpa(causal):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3, 5, 9, 1]
    q = torch.randn(sum(lengths), 4, 8, generator=gen)
    k, v = torch.randn(sum(lengths), 2, 8, generator=gen), torch.randn(sum(lengths), 2, 8, generator=gen)
    cu = torch.tensor([0, 5, 8, 13, 22, 23], dtype=torch.int32)
    got = reference_varlen(q, k, v, cu, 9, causal=causal, scale=0.3)
    torch.testing.assert_close(got, grouped_sdpa(q, k, v, lengths, causal=causal, scale=0.3), atol=1e-6, rtol=1e-5)


def test_injected_varlen_kernel_gives_the_grouped_sdpa_hidden_states(backend):
    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", moe_mode="guided").eval()
    assert emb.packing
    queries = [Query(f"q{i}", "word " * (2 + 7 * i)) for i in range(4)] + [Query("q-same", "word " * 9)]
    batch = emb.collate(emb.build_query_inputs(queries))
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 2

    calls = []

    def recording(q, k, v, cu, max_len, *, causal, scale):
        calls.append((cu.clone(), max_len, causal, scale, q.shape, k.shape))
        return reference_varlen(q, k, v, cu, max_len, causal=causal, scale=scale)

    with torch.no_grad():
        backend("grouped_sdpa")
        ref = emb.hidden_states(batch)
        backend(recording)
        got = emb.hidden_states(batch)
    assert float((got - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1  # not trivially equal

    assert len(calls) == len(emb.family.text_model(emb.backbone).layers)  # one call per decoder layer
    expected_cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for cu, max_len, causal, scale, q_shape, k_shape in calls:
        assert torch.equal(cu, expected_cu)
        assert max_len == max(lengths)
        assert causal is True  # a decoder
        assert scale == pytest.approx(q_shape[-1] ** -0.5)
        assert q_shape[0] == k_shape[0] == sum(lengths)
