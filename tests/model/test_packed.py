"""Packed sequences (``moon.model.packed``): the same function as the padded path, for the graft family.

Tolerances: in float32 the packed and padded paths do the same arithmetic per token except for the
matmul blocking over a different number of rows and the attention over L real keys instead of L
keys of which some are masked (their softmax weight is exactly 0), so vectors differ by a few ulps
of unit vectors (~1e-7) and gradients by a few ulps of their own scale. 1e-5 leaves about two orders
of magnitude of margin. The MoE router and guidance gradients are sums of per-token terms of both
signs (through the softmax over the gates), far smaller than their terms, so their rounding is
measured against the model's overall gradient scale instead of their own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moon.data import Product, Query
from moon.model import MoonEmbedder
from moon.model.config import MoonConfig
from moon.model.moe import moe_layers
from moon.model.packed import ATTN_IMPL, PackedLayout, grouped_sdpa
from moon.train.chunked import forward_backward

_TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
}


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(40, 160, size=2))
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def records() -> tuple[list[Product], list[Query]]:
    """Products with 1–6 images (crops on some), text only, image only; queries of every modality."""
    products = [
        Product(f"p{n}", "word " * (3 + 5 * n), [_image(10 * n + i) for i in range(n)], ["A", f"B{n}"],
                {"color": ["red"]} if n % 2 else {}, crops=[_image(100 + n)] if n in (2, 5) else [])
        for n in range(1, 7)
    ]  # fmt: skip
    products += [Product("p-text", "usb cable " * 9, [], ["Electronics"], {}), Product("p-image", "", [_image(7)])]
    queries = [
        Query("q-text", "red shoes for running"),
        Query("q-image", None, [_image(200)]),
        Query("q-multimodal", "a mug like this but bigger", [_image(201), _image(202)]),
        Query("q-long", "very " * 30 + "long text query"),
    ]
    return products, queries


def _model(moe: bool, **overrides) -> MoonEmbedder:
    emb = MoonEmbedder.from_pretrained(
        "moon-graft-tiny", device="cpu", moe_mode="guided" if moe else "dense", **overrides
    )
    # make the experts differ from each other (upcycled experts start as copies of the dense MLP),
    # so a token routed with the wrong tag would change the result
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(emb):
            for expert in layer.experts:
                for p in expert.parameters():
                    p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return emb


@pytest.fixture(scope="module")
def models() -> dict[str, MoonEmbedder]:
    return {"moe": _model(True), "dense": _model(False)}


def _grads(emb: MoonEmbedder) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}
    emb.zero_grad(set_to_none=True)
    return grads


def _vectors_and_grads(emb: MoonEmbedder, items, packed: bool):
    emb.config.packed = packed
    emb.zero_grad(set_to_none=True)
    emb.train()
    try:
        vec = emb(emb.collate(items))
        direction = torch.randn(vec.shape, generator=torch.Generator().manual_seed(1))
        ((vec * direction).sum() + emb.aux_loss()).backward()
        return vec.detach(), _grads(emb)
    finally:
        emb.eval()
        emb.config.packed = True


def _assert_same_grads(g_pack: dict[str, torch.Tensor], g_pad: dict[str, torch.Tensor]) -> None:
    assert set(g_pack) == set(g_pad) and len(g_pad) > 10
    overall = max(float(g.abs().max()) for g in g_pad.values())
    for key, ref in g_pad.items():
        err = float((g_pack[key] - ref).abs().max())
        assert err <= 1e-5 * overall, key
        if not key.endswith(("router.weight", "guidance")):
            assert err <= 1e-5 * float(ref.abs().max()), key


@pytest.mark.parametrize("moe", ["moe", "dense"])
def test_packed_equals_padded_forward_and_gradients(moe, models, records):
    emb = models[moe]
    assert emb.packing, "the graft's Qwen2 decoder is packable"
    products, queries = records
    for items in (emb.build_product_inputs(products), emb.build_query_inputs(queries)):
        lengths = [len(x) for x in items]
        assert max(lengths) > 2 * min(lengths)  # the batch really is padded
        v_pad, g_pad = _vectors_and_grads(emb, items, packed=False)
        v_pack, g_pack = _vectors_and_grads(emb, items, packed=True)
        assert float((v_pack - v_pad).abs().max()) <= 1e-5
        _assert_same_grads(g_pack, g_pad)
        assert any(k.endswith("projector.1.weight") for k in g_pad)  # gradients reach the image side
        if moe == "moe":
            assert any(k.endswith("router.weight") for k in g_pad)


def test_a_llama_decoder_packs_too(records):
    emb = _model(True, graft={"lm_config": _TINY_LLAMA})
    assert emb.family.text_model(emb.backbone).config.model_type == "llama" and emb.packing
    items = emb.build_product_inputs(records[0])
    v_pad, g_pad = _vectors_and_grads(emb, items, packed=False)
    v_pack, g_pack = _vectors_and_grads(emb, items, packed=True)
    assert float((v_pack - v_pad).abs().max()) <= 1e-5
    _assert_same_grads(g_pack, g_pad)


def test_gradient_checkpointing_and_gradcache_chunks_see_the_same_gradients(records):
    emb = _model(True)
    emb.gradient_checkpointing_enable()
    products, queries = records
    q_items, p_items = emb.build_query_inputs(queries), emb.build_product_inputs(products)

    def loss_fn(q, p):
        scores = q @ p[: len(q)].T / 0.05
        return F.cross_entropy(scores, torch.arange(len(q))), {}

    runs = {}
    for packed in (False, True):
        emb.config.packed = packed
        emb.train()
        forward_backward(emb, q_items, p_items, loss_fn, chunk_size=3, aux_weight=0.01, check_replay=True)
        runs[packed] = _grads(emb)
    emb.config.packed = True
    _assert_same_grads(runs[True], runs[False])


def test_encode_is_unchanged_by_packing(models, records):
    emb = models["moe"]
    products, queries = records
    packed = (emb.encode_products(products, batch_size=4), emb.encode_queries(queries, batch_size=4))
    emb.config.packed = False
    try:
        padded = (emb.encode_products(products, batch_size=4), emb.encode_queries(queries, batch_size=4))
    finally:
        emb.config.packed = True
    for a, b in zip(packed, padded, strict=True):
        assert np.abs(a - b).max() <= 1e-5


def test_routing_statistics_count_the_same_tokens(models, records):
    emb = models["moe"]
    items = emb.build_product_inputs(records[0])
    stats = {}
    for packed in (False, True):
        emb.config.packed = packed
        emb.routing_stats(reset=True)
        with torch.no_grad():
            emb(emb.collate(items))
        stats[packed] = emb.routing_stats(reset=True)
    emb.config.packed = True
    assert stats[True].keys() == stats[False].keys() and stats[True]
    for layer in stats[True]:
        np.testing.assert_array_equal(stats[True][layer]["counts"], stats[False][layer]["counts"])
    assert sum(int(s["counts"].sum()) for s in stats[True].values()) == len(stats[True]) * sum(len(x) for x in items)


# --------------------------------------------------------------------------- the switch


def test_the_switch_is_on_by_default_and_left_out_of_configs_and_fingerprints(models):
    assert MoonConfig().packed is True
    assert "packed" not in MoonConfig().to_dict()  # configs saved before the switch read the same
    assert MoonConfig(packed=False).to_dict()["packed"] is False
    assert MoonConfig.from_dict(MoonConfig(packed=False).to_dict()).packed is False
    emb = models["dense"]
    on = emb.fingerprint()
    emb.config.packed = False
    try:
        assert emb.fingerprint() == on  # an index built either way accepts the model
    finally:
        emb.config.packed = True


def test_a_saved_model_without_the_key_loads_packed(tmp_path, models, records):
    emb = models["moe"]
    emb.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "embedder.json").read_text())
    assert "packed" not in meta["config"]  # exactly what a save from before the switch holds
    again = MoonEmbedder.from_pretrained(str(tmp_path / "m"), device="cpu")
    assert again.config.packed is True and again.packing
    assert again.fingerprint() == emb.fingerprint()
    np.testing.assert_allclose(again.encode_products(records[0]), emb.encode_products(records[0]), atol=1e-6)


def test_packing_can_be_switched_off_and_saved(tmp_path, records):
    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", packed=False)
    assert not emb.packing
    emb.save_pretrained(tmp_path / "m")
    again = MoonEmbedder.from_pretrained(str(tmp_path / "m"), device="cpu")
    assert again.config.packed is False and not again.packing
    on = MoonEmbedder.from_pretrained(str(tmp_path / "m"), device="cpu", packed=True)
    assert on.packing and on.fingerprint() == again.fingerprint()
    np.testing.assert_allclose(on.encode_products(records[0]), again.encode_products(records[0]), atol=1e-5)


def test_the_padded_path_goes_through_moon_sdpa(models):
    assert models["dense"].family.text_model(models["dense"].backbone).config._attn_implementation == ATTN_IMPL


# --------------------------------------------------------------------------- the pieces


def test_layout_packs_and_unpacks_right_padded_batches():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    layout = PackedLayout.from_mask(mask)
    assert layout.lengths == [3, 1, 4] and layout.total == 8 and layout.max_len == 4
    assert layout.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert layout.positions().tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    x = torch.arange(12.0).view(3, 4, 1) + 1
    packed = layout.pack(x)
    assert packed.shape == (1, 8, 1) and packed.flatten().tolist() == [1, 2, 3, 5, 9, 10, 11, 12]
    assert torch.equal(layout.unpack(packed), x * mask.unsqueeze(-1))


@pytest.mark.parametrize(
    "mask", [[[0, 1, 1], [1, 1, 1]], [[1, 0, 1], [1, 1, 1]], [[0, 0, 0], [1, 1, 1]]], ids=["left", "hole", "empty"]
)
def test_layout_refuses_what_collate_never_makes(mask):
    with pytest.raises(ValueError, match="right-padded|at least one token"):
        PackedLayout.from_mask(torch.tensor(mask))


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_sdpa_equals_a_block_diagonal_mask(causal):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3, 5, 1, 7]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=gen)
    k, v = torch.randn(total, 2, 8, generator=gen), torch.randn(total, 2, 8, generator=gen)
    got = grouped_sdpa(q, k, v, lengths, causal=causal, scale=None)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(total, total, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.repeat_interleave(2, 1).transpose(0, 1)[None],
        v.repeat_interleave(2, 1).transpose(0, 1)[None], attn_mask=allowed,
    )[0].transpose(0, 1)  # fmt: skip
    assert float((got - ref).abs().max()) <= 1e-5


def test_no_mask_is_built_for_the_packed_row(models, records, monkeypatch):
    import transformers.masking_utils as masking

    built = []
    real = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **kw: built.append(1) or real(*a, **kw))
    emb = models["dense"]
    batch = emb.collate(emb.build_query_inputs(records[1]))
    with torch.no_grad():
        emb(batch)
        assert built == []  # the attention is block-diagonal from the layout, no T × T mask
        emb.config.packed = False
        try:
            emb(batch)
        finally:
            emb.config.packed = True
    assert built  # the padded path still builds transformers' SDPA mask
