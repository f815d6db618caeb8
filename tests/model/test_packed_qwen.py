"""Packed sequences for the Qwen-VL family: the same function as the padded path (M-RoPE, vision tower).

The packed path (``QwenVLFamily.hidden_states(packed=True)``) gathers the real tokens of the batch
into one row, places the image features at its image tokens, gathers the 3-D M-RoPE position ids the
padded forward computes, and attends block-diagonally. Tolerances as in ``test_packed.py``: float32,
1e-5 for vectors and for every parameter's gradient (router and guidance gradients against the
model's overall gradient scale, see that module's docstring).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moon.data import Product, Query
from moon.model import MoonEmbedder
from moon.model.backbone import backbone_config_from_dict, build_backbone
from moon.model.config import PRESETS
from moon.model.family import QWEN_VL
from moon.model.moe import moe_layers
from moon.model.packed import ATTN_IMPL, PackedLayout
from moon.train.chunked import forward_backward


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = (int(x) for x in rng.integers(40, 200, size=2))  # several grid sizes under max_pixels
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def records() -> tuple[list[Product], list[Query]]:
    """Products with 1–6 images of varied sizes (crops on some), text only, image only; queries of
    every modality."""
    products = [
        Product(f"p{n}", "word " * (3 + 5 * n), [_image(10 * n + i) for i in range(n)], ["A", f"B{n}"],
                {"color": ["red"]} if n % 2 else {}, crops=[_image(100 + n)] if n in (2, 5) else [])
        for n in (3, 1, 6, 2, 5, 4)
    ]  # fmt: skip
    products += [Product("p-text", "usb cable " * 9, [], ["Electronics"], {}), Product("p-image", "", [_image(7)])]
    queries = [
        Query("q-text", "red shoes for running"),
        Query("q-image", None, [_image(200)]),
        Query("q-multimodal", "a mug like this but bigger", [_image(201), _image(202)]),
        Query("q-long", "very " * 30 + "long text query"),
    ]
    return products, queries


def _perturb_experts(emb: MoonEmbedder) -> MoonEmbedder:
    # upcycled experts start as copies of the dense MLP: make them differ, so a token routed with
    # the wrong tag would change the result
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(emb):
            for expert in layer.experts:
                for p in expert.parameters():
                    p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return emb


def _model(moe: bool, name: str = "moon-tiny", **overrides) -> MoonEmbedder:
    emb = MoonEmbedder.from_pretrained(name, device="cpu", moe_mode="guided" if moe else "dense", **overrides)
    return _perturb_experts(emb)


@pytest.fixture(scope="module")
def models() -> dict[str, MoonEmbedder]:
    return {"moe": _model(True), "dense": _model(False)}


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory) -> MoonEmbedder:
    """A tiny Qwen2-VL (not 2.5) checkpoint saved by transformers, loaded like a hub id, guided MoE."""
    import transformers

    spec = dict(PRESETS["moon-tiny"].backbone)
    spec["model_type"] = "qwen2_vl"
    spec["vision_config"] = {
        "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }  # fmt: skip
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("qwen2-vl") / "ckpt"
    transformers.Qwen2VLModel(backbone_config_from_dict(spec)).save_pretrained(path)
    return _model(True, str(path), min_pixels=56 * 56, max_pixels=112 * 112)


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


def _grad_errors(g_pack: dict[str, torch.Tensor], g_pad: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Asserts packed == padded for every parameter's gradient; returns the largest absolute and
    relative (to that parameter's own gradient scale) differences."""
    assert set(g_pack) == set(g_pad) and len(g_pad) > 10
    overall = max(float(g.abs().max()) for g in g_pad.values())
    worst_abs = worst_rel = 0.0
    for key, ref in g_pad.items():
        err = float((g_pack[key] - ref).abs().max())
        worst_abs = max(worst_abs, err)
        assert err <= 1e-5 * overall, key
        if not key.endswith(("router.weight", "guidance")):
            scale = float(ref.abs().max())
            assert err <= 1e-5 * scale, key
            worst_rel = max(worst_rel, err / scale if scale else 0.0)
    return worst_abs, worst_rel


def _check_same(emb: MoonEmbedder, items) -> None:
    lengths = [len(x) for x in items]
    assert max(lengths) > 2 * min(lengths)  # the batch really is padded
    v_pad, g_pad = _vectors_and_grads(emb, items, packed=False)
    v_pack, g_pack = _vectors_and_grads(emb, items, packed=True)
    assert float((v_pack - v_pad).abs().max()) <= 1e-5
    _grad_errors(g_pack, g_pad)
    assert any("visual" in k for k in g_pad)  # gradients reach the vision tower
    if moe_layers(emb):
        assert any(k.endswith("router.weight") for k in g_pad)


@pytest.mark.parametrize("moe", ["moe", "dense"])
def test_qwen_vl_packed_equals_padded_for_products(moe, models, records):
    emb = models[moe]
    assert emb.packing, "the Qwen2.5-VL preset packs"
    items = emb.build_product_inputs(records[0])
    assert len({int(x.image_grid_thw.prod(-1).sum()) for x in items if x.image_grid_thw is not None}) > 3
    _check_same(emb, items)


@pytest.mark.parametrize("moe", ["moe", "dense"])
def test_qwen_vl_packed_equals_padded_for_queries(moe, models, records):
    _check_same(models[moe], models[moe].build_query_inputs(records[1]))


def test_qwen2_vl_packs_too(qwen2_vl, records):
    emb = qwen2_vl
    assert emb.family.text_model(emb.backbone).config.model_type == "qwen2_vl_text" and emb.packing
    _check_same(emb, emb.build_product_inputs(records[0]))


def test_m_rope_positions_matter(models, records, monkeypatch):
    """1-D positions restarting per sequence (what the graft uses) instead of the M-RoPE ids: the
    packed path no longer equals the padded one — the comparison above does check the positions."""
    emb = models["dense"]
    batch = emb.collate(emb.build_product_inputs(records[0]))
    with torch.no_grad():
        emb.config.packed = False
        padded = emb(batch)
        emb.config.packed = True
        assert float((emb(batch) - padded).abs().max()) <= 1e-5
        monkeypatch.setattr(PackedLayout, "pack_positions", lambda self, pos: self.positions().expand(3, -1, -1))
        assert float((emb(batch) - padded).abs().max()) > 1e-4  # > 10× the tolerance of the tests above


def test_qwen_vl_gradient_checkpointing_and_gradcache_chunks(records):
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
    _grad_errors(runs[True], runs[False])


def test_qwen_vl_encode_and_routing_statistics_are_unchanged(models, records):
    emb = models["moe"]
    products, queries = records
    items = emb.build_product_inputs(products)
    out, stats = {}, {}
    for packed in (True, False):
        emb.config.packed = packed
        emb.routing_stats(reset=True)
        with torch.no_grad():
            emb(emb.collate(items))
        stats[packed] = emb.routing_stats(reset=True)
        out[packed] = (emb.encode_products(products, batch_size=4), emb.encode_queries(queries, batch_size=4))
    emb.config.packed = True
    for a, b in zip(out[True], out[False], strict=True):
        assert np.abs(a - b).max() <= 1e-5
    assert stats[True].keys() == stats[False].keys() and stats[True]
    for layer in stats[True]:
        np.testing.assert_array_equal(stats[True][layer]["counts"], stats[False][layer]["counts"])


def test_qwen_vl_packing_switch_and_attention(models):
    emb = models["dense"]
    assert emb.config.packed and emb.packing
    assert emb.family.text_model(emb.backbone).config._attn_implementation == ATTN_IMPL
    # the vision tower keeps transformers' own attention
    assert emb.family.vision_module(emb.backbone).config._attn_implementation == "sdpa"
    off = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode="dense", packed=False)
    assert not off.packing


def test_sliding_window_qwen_vl_keeps_the_padded_path():
    spec = dict(PRESETS["moon-tiny"].backbone)
    spec["text_config"] = {**spec["text_config"], "use_sliding_window": True, "sliding_window": 16}
    backbone = build_backbone(backbone_config_from_dict(spec), seed=0)
    assert QWEN_VL.install_packing(backbone) is False
    assert QWEN_VL.text_model(backbone).config._attn_implementation == "sdpa"
