"""Packed sequences: run the graft's decoder on the real tokens of a batch only, never on padding.

A collated batch is right-padded ``(B, L)``; a product has 1–6 images plus crops, so lengths vary by
2× inside a batch and a padded decoder spends a large share of its time on pad tokens. The packed
path (``MoonConfig.packed``, on by default) takes the same padded batch, gathers its real tokens
into one ``(1, T)`` row (``T = Σ lengths``), runs embeddings, MoE and every linear layer on those
``T`` tokens only, attends within each sequence (block-diagonal causal attention, rotary positions
restarting at 0 in every sequence) and scatters the last hidden states back to ``(B, L, H)`` (zeros
at padding), so pooling and everything after it are unchanged. Same function as the padded path:
``tests/model/test_packed.py`` holds it to 1e-5 in float32, forward and gradients.

Attention over the packed row (:func:`packed_attention`) has two backends:

* ``grouped_sdpa`` (:func:`grouped_sdpa`, any device): sequences of equal length are stacked and sent
  to one ``scaled_dot_product_attention`` call with ``is_causal=True``, so each sequence attends to
  itself only and no ``T × T`` mask is ever built;
* ``varlen`` (CUDA): one variable-length FlashAttention call over ``cu_seqlens`` per layer,
  flash-attention's ``flash_attn_varlen_func`` or torch's ``torch.nn.attention.varlen.varlen_attn``,
  whichever imports and passes a one-time check (forward and backward, causal and not, GQA) against
  ``grouped_sdpa`` on that device and dtype (:func:`varlen_kernel`).

Which one runs is :data:`ATTENTION_BACKEND`, read on every call: initially the environment variable
``MOON_PACKED_ATTENTION`` (default ``auto``). ``auto``: ``varlen`` on CUDA where a kernel passes the
check, else ``grouped_sdpa``; on CPU always ``grouped_sdpa``. ``grouped_sdpa`` forces it; ``varlen``
forces the kernel (an error where none imports). The module-level setting may also be assigned a
function ``fn(q, k, v, cu_seqlens, max_seqlen, *, causal, scale)`` (``(T, nh, d)`` q, ``(T, nkv, d)``
k/v, ``(B+1,)`` int32 offsets → ``(T, nh, d)``), used as the varlen kernel on every device, unchecked
(how ``tests/model/test_packed_backends.py`` tests the wiring without a GPU).

How it hooks into transformers without patching: :func:`install` registers one attention function,
``moon_sdpa``, with transformers' ``AttentionInterface`` (and :func:`moon_sdpa_mask`, the SDPA mask
or none inside a packed forward, with ``AttentionMaskInterface``) and sets it on the decoder's config. That function *is* transformers'
SDPA attention unless the call carries a :class:`PackedLayout` (keyword ``moon_packed``), so the
padded path computes exactly what it did before. :func:`decoder_forward` calls the decoder's own
forward on the packed row with no mask, position ids restarting per sequence and the
layout as a keyword that transformers forwards, through every layer, to the attention function.

The Qwen-VL family (Qwen2-VL, Qwen2.5-VL) packs the same way: its vision tower already runs all
images of a batch as one concatenated sequence, so only the text decoder changes. The 3-D M-RoPE
position ids are computed on the padded batch by the model's own ``get_rope_index`` (exactly what the
padded forward uses) and gathered for the real tokens (:meth:`PackedLayout.pack_positions`), and the
image features are placed at the image tokens of the packed row, in the same order as the padded
forward places them (``QwenVLFamily.hidden_states``).

Only decoder types checked to be the same function packed (:data:`PACKABLE`: Llama/SmolLM, Qwen2,
the Qwen2-VL and Qwen2.5-VL text decoders) are packed; anything else (other LM types such as
Qwen3-VL's, whose deepstack features enter inside the decoder, sliding windows, another attention
implementation, attention dropout) keeps the padded path (:func:`why_unsupported`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTN_IMPL = "moon_sdpa"
_BASE_IMPL = "sdpa"
#: decoder model types tested packed == padded (tests/model/test_packed.py, test_packed_qwen.py)
PACKABLE = ("llama", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text")
#: ``fn(q, k, v, cu_seqlens, max_seqlen, *, causal, scale) -> out``: a variable-length attention kernel
VarlenFn = Callable[..., torch.Tensor]
#: the packed attention backend: ``auto`` | ``grouped_sdpa`` | ``varlen`` or a :data:`VarlenFn` (see the
#: module docstring); read on every call
ATTENTION_BACKEND: str | VarlenFn = os.environ.get("MOON_PACKED_ATTENTION", "auto")
BACKENDS = ("auto", "grouped_sdpa", "varlen")


# --------------------------------------------------------------------------- the layout


@dataclass
class PackedLayout:
    """Where the real tokens of a right-padded ``(B, L)`` batch sit once packed into ``(1, T)``.

    ``index`` ``(T,)`` positions in the flattened ``(B·L)`` batch, ``lengths`` the host-side
    sequence lengths (``B`` ints, all ``>= 1``), ``cu_seqlens`` ``(B+1,)`` int32 offsets on the
    compute device, ``max_len`` the longest sequence.
    """

    index: torch.Tensor
    lengths: list[int]
    cu_seqlens: torch.Tensor
    max_len: int
    batch: int
    width: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> PackedLayout:
        """Layout of a right-padded ``(B, L)`` 0/1 mask (on the compute device)."""
        if attention_mask.ndim != 2:
            raise ValueError(f"packed: attention_mask must be (B, L), got {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        lengths_t = mask.sum(1)
        lengths = [int(n) for n in lengths_t.tolist()]
        b, width = mask.shape
        if not lengths or min(lengths) < 1:
            raise ValueError("packed: every sequence needs at least one token")
        # right padding is what collate() makes; a left-padded or holed mask would pack wrongly
        expected = torch.arange(width, device=mask.device)[None, :] < lengths_t[:, None]
        if not bool(torch.equal(expected, mask)):
            raise ValueError("packed: the batch is not right-padded (collate() makes right-padded batches)")
        cu = torch.zeros(b + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = torch.cumsum(lengths_t, 0)
        index = mask.reshape(-1).nonzero().squeeze(1)
        return cls(index, lengths, cu, max(lengths), b, width)

    @property
    def total(self) -> int:
        return int(self.index.shape[0])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, …)`` → ``(1, T, …)`` (real tokens only, sequence after sequence)."""
        return x.reshape(self.batch * self.width, *x.shape[2:]).index_select(0, self.index).unsqueeze(0)

    def positions(self) -> torch.Tensor:
        """``(1, T)`` position ids restarting at 0 in every sequence (what the padded forward gives
        the real tokens of a right-padded row: ``arange(L)``)."""
        dev = self.index.device
        starts = self.cu_seqlens[:-1].long().repeat_interleave(torch.tensor(self.lengths, device=dev))
        return (torch.arange(self.total, device=dev) - starts).unsqueeze(0)

    def pack_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``(R, B, L)`` position ids (M-RoPE: ``R = 3``) → ``(R, 1, T)``: those of the real tokens."""
        return positions.reshape(positions.shape[0], -1).index_select(1, self.index).unsqueeze(1)

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """``(1, T, H)`` → ``(B, L, H)`` with zeros at padding."""
        flat = h.new_zeros(self.batch * self.width, h.shape[-1]).index_copy(0, self.index, h[0])
        return flat.view(self.batch, self.width, -1)


# --------------------------------------------------------------------------- attention


def grouped_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], *, causal: bool, scale: float | None
) -> torch.Tensor:
    """``(T, nh, d)`` packed q and ``(T, nkv, d)`` k/v → ``(T, nh, d)``: one SDPA call per distinct
    sequence length (sequences of that length stacked into a batch), each sequence attending to
    itself only (block-diagonal, causal within the block when ``causal``)."""
    gqa = k.shape[1] != q.shape[1]
    if len(lengths) == 1:  # one sequence: no gather needed
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=causal, scale=scale, enable_gqa=gqa,
        )  # fmt: skip
        return o[0].transpose(0, 1)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(starts[i])
    out = q.new_zeros(q.shape)
    for n, seg_starts in by_len.items():
        idx = (torch.tensor(seg_starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(-1)
        qs, ks, vs = (x.index_select(0, idx).view(len(seg_starts), n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out = out.index_copy(0, idx, o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2]))
    return out


def _flash_attn_varlen() -> VarlenFn:
    from flash_attn import flash_attn_varlen_func  # GQA natively (k/v heads divide q heads)

    def fn(q, k, v, cu, max_len, *, causal, scale):
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)

    return fn


def _torch_varlen(expand_kv: bool) -> VarlenFn:
    from torch.nn.attention.varlen import varlen_attn

    # its keyword arguments differ between torch releases: chosen from its signature (and checked)
    params = frozenset(inspect.signature(varlen_attn).parameters)

    def fn(q, k, v, cu, max_len, *, causal, scale):
        kwargs: dict = {"scale": scale}
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if k.shape[1] != q.shape[1]:
            if expand_kv or "enable_gqa" not in params:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            else:
                kwargs["enable_gqa"] = True
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)

    return fn


_VARLEN_CANDIDATES: tuple[tuple[str, Callable[[], VarlenFn]], ...] = (
    ("flash_attn.flash_attn_varlen_func", _flash_attn_varlen),
    ("torch varlen_attn (enable_gqa)", lambda: _torch_varlen(False)),
    ("torch varlen_attn (k/v heads expanded)", lambda: _torch_varlen(True)),
)


def _varlen_agrees(fn: VarlenFn, device: torch.device, dtype: torch.dtype) -> bool:
    """``fn`` against :func:`grouped_sdpa` on ``device``/``dtype``: outputs and input gradients,
    causal and not, 4 query heads over 2 k/v heads, three sequences of different lengths, a scale
    other than the default ``d**-0.5`` (so a kernel that ignores it fails)."""
    lengths = [16, 40, 8]
    cu = torch.tensor([0, 16, 56, 64], device=device, dtype=torch.int32)
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator(device=device).manual_seed(0)
        for causal in (True, False):
            q = torch.randn(64, 4, 64, device=device, dtype=dtype, generator=gen).requires_grad_()
            kv = torch.randn(64, 2, 64, device=device, dtype=dtype, generator=gen).requires_grad_()
            got = fn(q, kv, kv, cu, 40, causal=causal, scale=0.2)
            g_q, g_kv = torch.autograd.grad(got.float().square().sum(), (q, kv))
            ref = grouped_sdpa(q, kv, kv, lengths, causal=causal, scale=0.2)
            r_q, r_kv = torch.autograd.grad(ref.float().square().sum(), (q, kv))
            for a, b in ((got, ref), (g_q, r_q), (g_kv, r_kv)):
                if a.shape != b.shape or not bool((a.float() - b.float()).norm() / b.float().norm() < 2e-2):
                    return False
    return True


@functools.cache
def varlen_kernel(device: torch.device, dtype: torch.dtype) -> VarlenFn | None:
    """The first variable-length kernel that imports, runs and agrees with :func:`grouped_sdpa` on
    ``device`` (CUDA only) and ``dtype``, checked once per device and dtype; ``None`` where none does."""
    if device.type != "cuda":
        return None
    for name, make in _VARLEN_CANDIDATES:
        if _in_own_thread(functools.partial(_probe, name, make, device, dtype)):
            return make()
    return None


def _probe(name: str, make: Callable[[], VarlenFn], device: torch.device, dtype: torch.dtype) -> bool:
    try:
        # (a new thread starts on the default CUDA device: the kernel must run on ``device``)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            agrees = _varlen_agrees(make(), device, dtype)
        if agrees:
            log.info("packed attention: %s on %s %s", name, device, dtype)
            return True
        log.info("packed attention: %s disagrees with grouped SDPA on %s %s", name, device, dtype)
    except Exception as exc:  # noqa: BLE001 - a kernel probe: a third-party CUDA kernel may fail
        # in any way (its own exception types, missing symbols, unsupported arch): all mean "not here"
        log.info("packed attention: %s unusable on %s %s: %s: %s", name, device, dtype, type(exc).__name__, exc)
    return False


def _in_own_thread(fn: Callable[[], bool]) -> bool:
    """``fn()`` in a thread of its own: the probe back-propagates, and the first packed forward may
    run inside gradient checkpointing, whose saved-tensor hooks (thread-local, like grad mode,
    inference mode and autocast) must not see the probe's tensors."""
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(fn()), name="moon-varlen-probe")
    worker.start()
    worker.join()
    return bool(result and result[0])


def attention_backend(device: torch.device, dtype: torch.dtype) -> VarlenFn | None:
    """The varlen kernel packed attention uses on ``device``/``dtype`` under :data:`ATTENTION_BACKEND`,
    or ``None`` for the grouped SDPA."""
    backend = ATTENTION_BACKEND
    if callable(backend):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"packed attention backend {backend!r}: expected one of {', '.join(BACKENDS)} or a function")
    if backend == "grouped_sdpa" or device.type != "cuda":
        if backend == "varlen":
            raise RuntimeError(f"packed attention backend 'varlen' needs CUDA, got {device.type}")
        return None
    fn = varlen_kernel(device, dtype)
    if fn is None and backend == "varlen":
        raise RuntimeError(f"packed attention backend 'varlen': no varlen kernel works on {device} {dtype}")
    return fn


def attention_backend_name(device: torch.device, dtype: torch.dtype) -> str:
    """``varlen`` or ``grouped_sdpa``: what :func:`packed_attention` runs on ``device``/``dtype``."""
    return "grouped_sdpa" if attention_backend(device, dtype) is None else "varlen"


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *, causal: bool, scale: float | None
) -> torch.Tensor:
    """``(T, nh, d)`` q, ``(T, nkv, d)`` k/v of a packed row → ``(T, nh, d)``, each sequence attending
    to itself only, by the backend :func:`attention_backend` picks."""
    fn = attention_backend(q.device, q.dtype)
    if fn is None:
        return grouped_sdpa(q, k, v, layout.lengths, causal=causal, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
    return fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, layout.max_len, causal=causal, scale=scale)


def moon_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as ``moon_sdpa``: packed attention when the call carries a
    :class:`PackedLayout` (``moon_packed``), else exactly transformers' SDPA attention."""
    layout: PackedLayout | None = kwargs.pop("moon_packed", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("packed attention has no dropout (install() leaves such decoders on the padded path)")
    # (1, nh, T, d) → (T, nh, d)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    causal = bool(getattr(module, "is_causal", True))
    out = packed_attention(q, k, v, layout, causal=causal, scale=scaling)
    return out.unsqueeze(0), None  # (1, T, nh, d), like transformers' attention functions


#: set while :func:`decoder_forward` runs: the packed row needs no mask (the attention is made
#: block-diagonal from the layout), so none is built (transformers would otherwise build a ``T × T``
#: block-diagonal mask from the restarting position ids)
_PACKED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("moon_packed_forward", default=False)


def moon_sdpa_mask(*args, **kwargs):
    """The mask function registered for ``moon_sdpa``: transformers' SDPA mask, or ``None`` inside a
    packed forward."""
    if _PACKED_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, moon_sdpa_attention)
    AttentionMaskInterface.register(ATTN_IMPL, moon_sdpa_mask)


# --------------------------------------------------------------------------- the decoder


def why_unsupported(decoder: nn.Module) -> str | None:
    """``None`` when :func:`decoder_forward` can run ``decoder``, else the reason it cannot."""
    cfg = decoder.config
    if getattr(cfg, "model_type", None) not in PACKABLE:
        return f"model type {getattr(cfg, 'model_type', None)!r} (packing supports {', '.join(PACKABLE)})"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (_BASE_IMPL, ATTN_IMPL):
        return f"attention implementation {impl!r} (packing needs sdpa)"
    types = getattr(cfg, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return "sliding-window layers"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout"
    return None


def install(decoder: nn.Module) -> bool:
    """Route ``decoder``'s attention through ``moon_sdpa`` (same results as SDPA unless packed);
    returns whether packing is possible for this decoder."""
    reason = why_unsupported(decoder)
    if reason is not None:
        log.info("packed sequences are off for %s: %s", type(decoder).__name__, reason)
        return False
    _register()
    decoder.config._attn_implementation = ATTN_IMPL
    return True


def decoder_forward(
    decoder: nn.Module, embeds: torch.Tensor, layout: PackedLayout, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The decoder on packed ``(1, T, H)`` input embeddings → ``(1, T, H)`` last hidden states.

    transformers' own forward of the decoder (its layers, gradient checkpointing included), with no
    mask built (:func:`moon_sdpa_mask`), the layout passed through to ``moon_sdpa``, which makes the
    attention block-diagonal, and ``positions``: default ``(1, T)`` ids restarting in every sequence
    (:meth:`PackedLayout.positions`); the Qwen-VL family passes its packed ``(3, 1, T)`` M-RoPE ids.
    """
    if decoder.config._attn_implementation != ATTN_IMPL:
        raise RuntimeError("packed decoder_forward() needs install(decoder) first")
    token = _PACKED_FORWARD.set(True)
    try:
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=None,
            position_ids=layout.positions() if positions is None else positions,
            use_cache=False,
            moon_packed=layout,
        )
    finally:
        _PACKED_FORWARD.reset(token)
    return out.last_hidden_state


__all__ = [
    "ATTENTION_BACKEND",
    "ATTN_IMPL",
    "BACKENDS",
    "PACKABLE",
    "PackedLayout",
    "VarlenFn",
    "attention_backend",
    "attention_backend_name",
    "decoder_forward",
    "grouped_sdpa",
    "install",
    "moon_sdpa_attention",
    "packed_attention",
    "varlen_kernel",
    "why_unsupported",
]
