"""Guided MoE: upcycling equivalence, aspect routing, balancing loss, checkpointing and LoRA."""

import numpy as np
import pytest
import torch

from moon.model import ASPECTS, EXPERTS, GuidedMoE, MoonEmbedder


def _batch(emb, products, queries):
    return emb.collate(emb.build_product_inputs(products) + emb.build_query_inputs(queries))


@pytest.mark.parametrize("mode", ["guided", "hard", "learned"])
def test_right_after_upcycling_hidden_states_equal_the_dense_model(tiny_dense, products, queries, mode):
    moe = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode=mode, moe_top_k=1 if mode == "hard" else 2)
    assert len([m for m in moe.modules() if isinstance(m, GuidedMoE)]) == 2
    assert not any(isinstance(m, GuidedMoE) for m in tiny_dense.modules())
    batch = _batch(tiny_dense, products, queries)
    with torch.no_grad():
        dense = tiny_dense.hidden_states(batch)
        routed = moe.hidden_states(batch)
    mask = batch["attention_mask"].bool()
    assert (dense[mask] - routed[mask]).abs().max() < 1e-5
    assert dense[mask].abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("mode", ["guided", "hard"])
def test_category_and_attribute_tokens_reach_their_experts(products, queries, mode):
    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode=mode)
    emb.routing_stats(reset=True)
    emb.encode_products(products)
    emb.encode_queries(queries)
    stats = emb.routing_stats(reset=True)
    assert sorted(stats) == emb.moe_layer_ids == [0, 1]
    for layer in stats.values():
        counts = layer["counts"]
        assert counts.shape == (len(ASPECTS), len(EXPERTS))
        for aspect, expert in [
            ("category", "category"),
            ("attribute", "attribute"),
            ("vision", "vision"),
            ("crop", "vision"),
            ("title", "text"),
            ("query_text", "text"),
        ]:
            row = counts[ASPECTS.index(aspect)]
            assert row.sum() > 0, aspect
            assert row[EXPERTS.index(expert)] == row.sum(), (aspect, row)
    assert emb.routing_stats() == {}  # reset


def test_routing_counts_only_real_tokens(tiny, products):
    tiny.routing_stats(reset=True)
    items = tiny.build_product_inputs(products)
    tiny.encode_products(products, batch_size=len(products))
    counts = tiny.routing_stats(reset=True)[0]["counts"]
    assert counts.sum() == sum(len(x) for x in items)


def test_load_balancing_loss(products):
    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode="learned")
    emb(emb.collate(emb.build_product_inputs(products)))
    aux = emb.aux_loss()
    # Switch loss E·Σ f·P is ≥ 1 (equality when balanced) times the configured weight
    assert aux.ndim == 0 and aux.item() >= emb.config.moe_aux_weight * (1 - 1e-4)
    aux.backward()
    assert all(
        m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
        for m in emb.modules()
        if isinstance(m, GuidedMoE)
    )
    dense = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode="dense")
    dense(dense.collate(dense.build_product_inputs(products[:1])))
    assert dense.aux_loss().item() == 0.0


def _grads(emb, batch_a, batch_b):
    emb.zero_grad(set_to_none=True)
    emb.train()
    # two forwards before one backward: recomputation of the first must see the first's tags
    loss = emb(batch_a)[:, 0].sum() + emb(batch_b)[:, 1].sum() + emb.aux_loss()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}
    emb.zero_grad(set_to_none=True)
    emb.eval()
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(products, queries):
    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode="guided", moe_guidance_init=8.0)
    batch_a = emb.collate(emb.build_product_inputs(products))
    batch_b = emb.collate(emb.build_query_inputs(queries))
    plain = _grads(emb, batch_a, batch_b)
    emb.routing_stats(reset=True)
    emb.gradient_checkpointing_enable()
    ckpt = _grads(emb, batch_a, batch_b)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # recomputation does not count twice: two forwards' worth of tokens
    tokens = int(batch_a["attention_mask"].sum()) + int(batch_b["attention_mask"].sum())
    assert emb.routing_stats()[0]["counts"].sum() == tokens


def test_lora_wrapping_keeps_routing_and_saves_merged(products, tmp_path):
    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode="guided")
    before = emb.encode_products(products)
    emb.enable_lora(r=4, alpha=8)
    trainable = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert any("lora_" in n and "experts" in n for n in trainable)
    assert any(n.endswith("router.weight") for n in trainable)
    assert not any("visual" in n for n in trainable)
    # LoRA B starts at zero: same vectors, same routing
    np.testing.assert_allclose(emb.encode_products(products), before, atol=1e-6)
    emb.gradient_checkpointing_enable()
    emb.train()
    batch = emb.collate(emb.build_product_inputs(products))
    opt = torch.optim.SGD([p for p in emb.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (emb(batch)[:, :8].sum() + emb.aux_loss()).backward()
        opt.step()
    emb.eval()
    trained = emb.encode_products(products)
    assert np.abs(trained - before).max() > 1e-4
    stats = emb.routing_stats(reset=True)
    cat = stats[0]["counts"][ASPECTS.index("category")]
    assert cat[EXPERTS.index("category")] == cat.sum() > 0
    emb.save_pretrained(tmp_path / "lora")
    again = MoonEmbedder.from_pretrained(str(tmp_path / "lora"), device="cpu")
    assert not any("lora_" in k for k in again.state_dict())
    np.testing.assert_allclose(again.encode_products(products), trained, atol=1e-5)


def test_dense_saved_model_can_be_upcycled_on_load(tiny_dense, products, tmp_path):
    tiny_dense.save_pretrained(tmp_path / "dense")
    moe = MoonEmbedder.from_pretrained(str(tmp_path / "dense"), device="cpu", moe_mode="guided")
    assert moe.moe_layer_ids == [0, 1] and moe.config.moe_mode == "guided"
    np.testing.assert_allclose(moe.encode_products(products), tiny_dense.encode_products(products), atol=1e-5)
