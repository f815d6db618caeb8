"""The embedder's contract: shapes, batch invariance, save/load round-trip, registry loading."""

import numpy as np
import pytest
import torch

from moon.model import MoonEmbedder
from moon.models import load_embedder


def _alone(encode, records):
    return np.concatenate([encode([r], batch_size=1) for r in records])


@pytest.mark.parametrize("pooling", ["mean", "last", "modality"])
def test_product_vector_alone_equals_vector_in_a_padded_batch(tiny, products, pooling):
    emb = tiny if pooling == "mean" else MoonEmbedder.from_pretrained("moon-tiny", device="cpu", pooling=pooling)
    batched = emb.encode_products(products, batch_size=len(products))
    alone = _alone(emb.encode_products, products)
    assert batched.dtype == np.float32 and batched.shape == (len(products), emb.dim)
    assert np.abs(batched - alone).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # the batch really is mixed-length and padded
    lengths = {len(x) for x in emb.build_product_inputs(products)}
    assert len(lengths) == len(products)


def test_query_vector_alone_equals_vector_in_a_padded_batch(tiny, queries):
    batched = tiny.encode_queries(queries, batch_size=len(queries))
    alone = _alone(tiny.encode_queries, queries)
    assert batched.shape == (len(queries), tiny.dim)
    assert np.abs(batched - alone).max() <= 1e-4


def test_output_order_follows_input_order_across_batches(tiny, products):
    one_batch = tiny.encode_products(products, batch_size=8)
    small = tiny.encode_products(products[::-1], batch_size=2)[::-1]
    assert np.abs(one_batch - small).max() <= 1e-4


def test_all_modalities_give_distinct_finite_vectors(tiny, products, queries):
    vecs = np.concatenate([tiny.encode_products(products), tiny.encode_queries(queries)])
    assert np.isfinite(vecs).all()
    sims = vecs @ vecs.T
    off_diag = sims[~np.eye(len(vecs), dtype=bool)]
    assert off_diag.max() < 0.99999  # different inputs → different vectors


def test_empty_input_gives_empty_array(tiny):
    assert tiny.encode_products([]).shape == (0, tiny.dim)


def test_save_then_load_gives_identical_vectors(tiny, products, queries, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"embedder.json", "model.safetensors", "backbone", "processor"} <= files
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    again = MoonEmbedder.from_pretrained(str(tmp_path / "m"), device="cpu")
    assert again.fingerprint() == tiny.fingerprint()
    assert again.config == tiny.config and again.dim == tiny.dim
    np.testing.assert_array_equal(again.encode_products(products), tiny.encode_products(products))
    np.testing.assert_array_equal(again.encode_queries(queries), tiny.encode_queries(queries))
    via_registry = load_embedder(str(tmp_path / "m"))
    assert isinstance(via_registry, MoonEmbedder) and via_registry.fingerprint() == tiny.fingerprint()


def test_presets_are_seeded_and_load_through_the_registry(tiny):
    again = load_embedder("moon-tiny")
    assert isinstance(again, MoonEmbedder) and again.fingerprint() == tiny.fingerprint()
    other_seed = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", seed=1)
    assert other_seed.fingerprint() != tiny.fingerprint()


def test_projection_and_matryoshka(products):
    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", projection_dim=48, matryoshka_dim=16)
    vecs = emb.encode_products(products[:2])
    assert emb.dim == 16 and vecs.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_forward_has_gradients(tiny, products):
    batch = tiny.collate(tiny.build_product_inputs(products[:2]))
    out = tiny(batch)
    assert out.shape == (2, tiny.dim) and out.requires_grad
    out.sum().backward()
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny.zero_grad(set_to_none=True)


def test_explain_product_gives_one_map_per_image(tiny, products):
    maps = tiny.explain_product(products[1])
    grid = tiny.build_product_inputs([products[1]])[0].image_grid_thw
    vision_grids = [
        g for g, a in zip(grid.tolist(), ["vision", "crop", "vision", "vision"], strict=True) if a == "vision"
    ]
    assert [m.shape for m in maps] == [(h // 2, w // 2) for _, h, w in vision_grids]
    for m in maps:
        assert m.dtype == np.float32 and m.max() == pytest.approx(1.0) and m.min() >= 0
    assert tiny.explain_product(products[2]) == []


def test_moon_3b_preset_builds_on_meta_without_memory():
    emb = MoonEmbedder.from_pretrained("moon-3b", device="meta")
    assert emb.dim == 2048 and emb.device.type == "meta"
    text_cfg = emb.backbone.config.get_text_config()
    assert (text_cfg.num_hidden_layers, text_cfg.intermediate_size) == (36, 11008)
    assert emb.moe_layer_ids == [32, 33, 34, 35]
    n_params = sum(p.numel() for p in emb.parameters())
    assert 3.5e9 < n_params < 5.5e9  # 3.75B dense + 4 × 4 expert copies of a 68M MLP


def test_bfloat16_model_still_returns_float32_vectors(tiny, products):
    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", dtype="bfloat16")
    assert emb.dtype == torch.bfloat16
    vecs = emb.encode_products(products)
    assert vecs.dtype == np.float32
    cos = (vecs * tiny.encode_products(products)).sum(1)
    assert cos.min() > 0.95
