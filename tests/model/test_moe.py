"""Guided MoE: upcycling equivalence, aspect routing, balancing loss, checkpointing and LoRA."""

import numpy as np
import pytest
import torch

from moon.data import Product, Query
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


def _spread_experts(emb, seed=0):
    """Make the aspect experts differ from one another and the router spread tokens over them."""
    from moon.model.moe import moe_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moe_layers(emb):
            for p in layer.experts.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            layer.router.weight.normal_(0, 1.0, generator=gen)


def _per_token_reference(layer, x):
    """The MoE layer's definition, one token at a time: shared expert and each chosen expert on the
    token alone, mixed with the router's gates (the routing itself is :meth:`GuidedMoE.route`)."""
    flat = x.reshape(-1, x.shape[-1])
    _, _, _, top_idx, gates = layer.route(flat)
    rows = []
    for t in range(flat.shape[0]):
        tok = flat[t : t + 1]
        y = layer.shared(tok) * gates[t, 0]
        for j in range(top_idx.shape[1]):
            y = y + layer.experts[int(top_idx[t, j])](tok) * gates[t, 1 + j]
        rows.append(y)
    return torch.cat(rows).reshape(x.shape)


@pytest.mark.parametrize(("mode", "top_k"), [("guided", 1), ("guided", 2), ("learned", 3), ("hard", 1)])
def test_expert_grouped_dispatch_equals_the_per_token_definition(mode, top_k):
    # forward and gradients (inputs and every weight) against a token-by-token loop, with padding
    # tokens (tag -1) and every aspect present
    from moon.model.moe import moe_layers

    emb = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode=mode, moe_top_k=top_k)
    _spread_experts(emb)
    layer = moe_layers(emb)[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, layer.router.in_features, generator=gen)
    tags = torch.randint(0, len(ASPECTS), (3, 11), generator=gen)
    tags[0, -3:] = -1
    tags[2, :] = torch.arange(11) % len(ASPECTS)
    emb.routing.dispatch = "loop"
    results = []
    for fn in (layer, lambda v: _per_token_reference(layer, v)):
        emb.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with emb.routing.using(tags.reshape(-1), recomputing=True):
            out = fn(xi)
        (out.square().sum() + out[:, :, 0].sum()).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((out.detach(), xi.grad, grads))
    (out, gx, grads), (ref, ref_gx, ref_grads) = results
    with emb.routing.using(tags.reshape(-1), recomputing=True):
        used = {int(e) for e in layer.route(x.reshape(-1, x.shape[-1]))[3].reshape(-1)}
    assert len(used) >= 2  # the test routes tokens to several experts
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any(k.startswith("experts.") for k in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_gemm_dispatch_equals_the_expert_loop(monkeypatch):
    # the grouped GEMM path's arithmetic (stacked gate|up and down weights, group offsets) is checked
    # on CPU even where ``auto`` does not pick it: torch 2.13's CPU grouped_mm runs forward and a
    # dense backward (it fails only for a stride-0 upstream gradient, which grouped_mm_works detects)
    import torch.nn.functional as F

    from moon.model import moe

    if not hasattr(F, "grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu")
    _spread_experts(emb)
    batch = emb.collate(
        emb.build_product_inputs([Product("a", "red mug " * 6, [], ["Home"]), Product("b", "usb cable")])
        + emb.build_query_inputs([Query("q", text="blue mug")])
    )
    outs = {}
    for dispatch in ("loop", "grouped_mm"):
        monkeypatch.setitem(moe._GROUPED_MM, ("cpu", torch.float32), True)  # taken as usable here
        emb.config = emb.config.replace(moe_dispatch=dispatch)
        emb.zero_grad(set_to_none=True)
        vec = emb(batch)
        vec.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None and ".experts." in n}
        outs[dispatch] = (vec.detach(), grads)
    torch.testing.assert_close(outs["grouped_mm"][0], outs["loop"][0], rtol=1e-5, atol=1e-5)
    assert outs["grouped_mm"][1].keys() == outs["loop"][1].keys() and outs["loop"][1]
    for name, g in outs["loop"][1].items():
        torch.testing.assert_close(outs["grouped_mm"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_forcing_an_unusable_grouped_gemm_is_a_clear_error(monkeypatch):
    from moon.errors import ConfigError
    from moon.model import moe

    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", moe_dispatch="grouped_mm")
    monkeypatch.setitem(moe._GROUPED_MM, ("cpu", torch.float32), False)
    batch = emb.collate(emb.build_product_inputs([Product("a", "red mug")]))
    with pytest.raises(ConfigError, match="moe_dispatch=grouped_mm: .*use moe_dispatch=auto or loop"):
        emb(batch)
    emb.config = emb.config.replace(moe_dispatch="auto")  # auto falls back to the loop
    assert emb(batch).shape[0] == 1


def test_moe_dispatch_is_a_runtime_switch():
    from moon.errors import ConfigError
    from moon.model import MoonConfig

    with pytest.raises(ConfigError, match="moe_dispatch='fast'"):
        MoonConfig(moe_dispatch="fast")
    assert "moe_dispatch" not in MoonConfig().to_dict()
    assert MoonConfig(moe_dispatch="loop").to_dict()["moe_dispatch"] == "loop"
    a = MoonEmbedder.from_pretrained("moon-tiny", device="cpu")
    b = MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_dispatch="loop")
    assert a.fingerprint() == b.fingerprint()


def test_the_experts_activation_is_recognised_as_silu():
    # the grouped GEMM path computes silu(gate) * up; transformers wraps SiLU in its own class
    from moon.model.moe import _expert_act_is_silu, moe_layers

    for name in ("moon-tiny", "moon-graft-tiny"):
        expert = moe_layers(MoonEmbedder.from_pretrained(name, device="cpu"))[0].experts[0]
        assert _expert_act_is_silu(expert), name
        expert_gelu = type("E", (torch.nn.Module,), {})()
        expert_gelu.act_fn = torch.nn.GELU()
        assert not _expert_act_is_silu(expert_gelu)


def test_the_grouped_gemm_check_does_not_depend_on_the_callers_grad_mode():
    # the answer is cached per device and dtype; it once depended on whether the first caller ran
    # under no_grad, which made two identical trainings dispatch differently
    from moon.model import moe

    saved = dict(moe._GROUPED_MM)
    try:
        answers = []
        for grad in (False, True):
            moe._GROUPED_MM.clear()
            with torch.set_grad_enabled(grad):
                answers.append(moe.grouped_mm_works(torch.device("cpu"), torch.float32))
        assert answers[0] == answers[1]
    finally:
        moe._GROUPED_MM.clear()
        moe._GROUPED_MM.update(saved)


def test_the_grouped_gemm_check_runs_inside_gradient_checkpointing(products):
    # the check back-propagates; first asked inside a checkpointed forward, the checkpoint's
    # saved-tensor hooks used to catch it (an AttributeError from inside torch.utils.checkpoint)
    from moon.model import moe

    saved = dict(moe._GROUPED_MM)
    try:
        moe._GROUPED_MM.clear()
        emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu")
        emb.gradient_checkpointing_enable()
        emb.train()
        emb(emb.collate(emb.build_product_inputs(products))).sum().backward()
        assert ("cpu", torch.float32) in moe._GROUPED_MM
    finally:
        moe._GROUPED_MM.clear()
        moe._GROUPED_MM.update(saved)
