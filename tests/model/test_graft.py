"""The graft family (image encoder → projector → causal LM) behind the MoonEmbedder API.

All on tiny random parts (``moon-graft-tiny``: a tiny CNN and a 2-layer Qwen2 decoder with the real
offline Qwen2 tokenizer), so no asset is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moon.errors import ConfigError
from moon.model import MoonEmbedder
from moon.model.config import ASPECTS
from moon.model.graft import FEATURE_CACHE, GraftModel
from moon.models import load_embedder

VISUAL = (ASPECTS.index("vision"), ASPECTS.index("crop"))


@pytest.fixture(scope="module")
def graft():
    return MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu")


def _alone(encode, records):
    return np.concatenate([encode([r], batch_size=1) for r in records])


def test_vectors_do_not_depend_on_the_batch(graft, products, queries):
    # float32 with right padding: a row's arithmetic is the same alone or in a batch except for the
    # matmul blocking, so differences stay at a few float32 ulps of unit vectors (<< 1e-5)
    batched = graft.encode_products(products, batch_size=len(products))
    assert batched.shape == (len(products), graft.dim) and np.isfinite(batched).all()
    assert np.abs(batched - _alone(graft.encode_products, products)).max() <= 1e-5
    q = graft.encode_queries(queries, batch_size=len(queries))
    assert np.abs(q - _alone(graft.encode_queries, queries)).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_save_then_load_gives_identical_vectors(graft, products, queries, tmp_path):
    graft.save_pretrained(tmp_path / "g")
    assert not list((tmp_path / "g").rglob("*.pt")) and not list((tmp_path / "g").rglob("*.bin"))
    again = load_embedder(str(tmp_path / "g"))
    assert isinstance(again, MoonEmbedder) and again.family.name == "graft"
    assert again.fingerprint() == graft.fingerprint()
    assert again.config == graft.config
    np.testing.assert_array_equal(again.encode_products(products), graft.encode_products(products))
    np.testing.assert_array_equal(again.encode_queries(queries), graft.encode_queries(queries))


def test_upcycled_moe_computes_what_the_dense_lm_computes(graft, products, queries):
    # every expert starts as a copy of the dense MLP and the gates sum to 1, so the MoE output is the
    # dense output up to float32 rounding of the weighted sum (a few ulps, far below 1e-5)
    dense = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", moe_mode="dense")
    assert graft.moe_layer_ids == [0, 1] and dense.moe_layer_ids == []
    items = graft.build_product_inputs(products) + graft.build_query_inputs(queries)
    with torch.no_grad():
        for item in items:
            batch = graft.collate([item])
            moe_h = graft.hidden_states(batch)
            dense_h = dense.hidden_states(batch)
            assert (moe_h - dense_h).abs().max().item() <= 1e-5
    # … and the plain transformers decoder, fed the same input embeddings, gives the same states
    item = graft.build_product_inputs(products[1:2])[0]
    batch = graft.collate([item])
    base: GraftModel = dense.backbone
    captured = {}
    hook = base.lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        ours = dense.hidden_states(batch)
    hook.remove()
    with torch.no_grad():
        theirs = base.lm(
            inputs_embeds=captured["inputs_embeds"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_visual_tokens_sit_exactly_at_the_image_positions(graft, products):
    product = products[1]  # three images and one crop
    item = graft.build_product_inputs([product])[0]
    batch = graft.collate([item])
    base: GraftModel = graft.backbone
    captured = {}
    hook = base.lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        graft.hidden_states(batch)
    hook.remove()
    embeds = captured["inputs_embeds"][0]
    tags = item.aspect_ids
    visual = (tags == VISUAL[0]) | (tags == VISUAL[1])
    k = graft.config.graft.image_tokens
    assert int(visual.sum()) == k * len(item.image_aspects) == k * 4
    with torch.no_grad():
        expected_visual = base.projector(item.pixel_values)
        table = base.lm.get_input_embeddings()(item.input_ids)
    torch.testing.assert_close(embeds[visual], expected_visual, rtol=0, atol=0)
    torch.testing.assert_close(embeds[~visual], table[~visual], rtol=0, atol=0)
    # each image's k tokens are bracketed by the <image> … </image> marker tokens
    open_ids = list(graft.inputs.markers.image_open)
    ids = item.input_ids.tolist()
    starts = [i for i in range(len(ids)) if ids[i : i + len(open_ids)] == open_ids]
    assert len(starts) == 4
    for s in starts:
        first = s + len(open_ids)
        assert visual[first : first + k].all() and not visual[first - 1] and not visual[first + k]


def test_visual_token_features_are_the_pooled_encoder_map(graft, products):
    from moon.data import load_image

    product = products[0]
    item = graft.build_product_inputs([product])[0]
    base: GraftModel = graft.backbone
    with torch.no_grad():
        pixels = torch.stack([base.vision.preprocess(load_image(product.images[0]))])
        fmap = base.vision(pixels)
    g = base.grid
    expected = torch.nn.functional.adaptive_avg_pool2d(fmap, g)[0].flatten(1).T  # (g*g, D), row-major cells
    # the cached path runs the conv encoder in channels_last layout: the same sums in another
    # order, so float32 rounding differs by a few ulps per accumulation (fan-in 144 at most here)
    fan_in = max(m.weight[0].numel() for m in base.vision.modules() if isinstance(m, torch.nn.Conv2d))
    tol = 4 * fan_in * torch.finfo(torch.float32).eps * float(expected.abs().max())
    torch.testing.assert_close(item.pixel_values, expected, rtol=0, atol=tol)


def test_frozen_encoder_features_are_computed_once_per_image_file(tmp_path):
    from PIL import Image

    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=3)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40 + i, 30), (i * 60, 20, 200)).save(p)
        paths.append(str(p))
    from moon.data import Product

    prods = [Product(f"p{i}", "mug", [paths[i]]) for i in range(3)]
    calls = []
    hook = emb.backbone.vision.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    first = emb.encode_products(prods)
    second = emb.encode_products(prods)
    hook.remove()
    assert sum(calls) == 3  # three images encoded once; the second pass read the cache
    np.testing.assert_array_equal(first, second)
    # a changed file is a new cache entry
    Image.new("RGB", (41, 31), (0, 0, 0)).save(paths[0])
    calls.clear()
    hook = emb.backbone.vision.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    emb.encode_products(prods[:1])
    hook.remove()
    assert calls == [1]
    # another encoder (other weights) never reads this one's features
    other = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=4)
    assert other.backbone.frozen_features.key() != emb.backbone.frozen_features.key()
    assert len(FEATURE_CACHE.entries) > 0


def test_lora_merge_keeps_the_vectors(products, queries, tmp_path):
    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=5)
    emb.enable_lora(r=4, alpha=8)
    names = [n for n, p in emb.named_parameters() if p.requires_grad]
    assert any(".lm." in n and "lora_" in n for n in names)
    assert not any("vision" in n for n in names)  # the frozen encoder stays frozen
    with torch.no_grad():  # move the adapters away from their zero init so the merge matters
        g = torch.Generator().manual_seed(0)
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    with_lora = emb.encode_products(products)
    emb.save_pretrained(tmp_path / "merged")
    merged = MoonEmbedder.from_pretrained(str(tmp_path / "merged"), device="cpu")
    # merging adds B·A·(alpha/r) into W once instead of applying it beside W: float32 rounding only
    np.testing.assert_allclose(merged.encode_products(products), with_lora, atol=2e-5)
    np.testing.assert_allclose(merged.encode_queries(queries), emb.encode_queries(queries), atol=2e-5)


def test_any_causal_lm_directory_plugs_in_and_keep_layers_truncates(tmp_path, products):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(tmp_path / "llama")
    # the Qwen2 offline tokenizer stands in for the LM's own (none is saved in this directory)
    graft = {"tokenizer": "qwen2-offline", "image_encoder": "tiny-cnn", "image_size": 64, "keep_layers": 2}
    emb = MoonEmbedder.from_pretrained(str(tmp_path / "llama"), device="cpu", graft=graft, moe_layers=[-1])
    assert emb.family.name == "graft" and type(emb.backbone.lm).__name__ == "LlamaModel"
    assert len(emb.backbone.lm.layers) == 2 and emb.moe_layer_ids == [1] and emb.dim == 48
    vecs = emb.encode_products(products)
    emb.save_pretrained(tmp_path / "saved")
    again = MoonEmbedder.from_pretrained(str(tmp_path / "saved"), device="cpu")
    assert len(again.backbone.lm.layers) == 2
    np.testing.assert_array_equal(again.encode_products(products), vecs)


def test_a_transformers_vision_tower_plugs_in(tmp_path, products):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tower = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8)
    )  # fmt: skip
    tower.save_pretrained(tmp_path / "siglip")
    emb = MoonEmbedder.from_pretrained(
        "moon-graft-tiny", device="cpu", graft={"image_encoder": f"hf:{tmp_path / 'siglip'}", "image_size": None}
    )
    assert emb.backbone.vision.feature_dim == 32 and emb.backbone.vision.image_size == 32
    vecs = emb.encode_products(products)
    assert np.isfinite(vecs).all()
    maps = emb.explain_product(products[1])
    assert [m.shape for m in maps] == [(4, 4)] * 3  # 32/8 = 4 × 4 patches, crops excluded
    emb.save_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(load_embedder(str(tmp_path / "saved")).encode_products(products), vecs)


def test_explain_product_gives_one_encoder_map_per_original_image(graft, products):
    maps = graft.explain_product(products[1])
    side = graft.backbone.vision.image_size // 8  # the tiny CNN has stride 8
    assert [m.shape for m in maps] == [(side, side)] * 3
    for m in maps:
        assert m.dtype == np.float32 and m.min() >= 0 and m.max() == pytest.approx(1.0)
    assert graft.explain_product(products[2]) == []  # no images


def test_routing_follows_the_aspects(graft, products):
    graft.routing_stats(reset=True)
    graft.encode_products(products)
    stats = graft.routing_stats(reset=True)
    assert sorted(stats) == graft.moe_layer_ids
    counts = stats[graft.moe_layer_ids[0]]["counts"]
    experts = stats[graft.moe_layer_ids[0]]["experts"]
    assert counts[ASPECTS.index("vision")].argmax() == experts.index("vision")
    assert counts[ASPECTS.index("category")].argmax() == experts.index("category")


def test_freeze_lower_layers_and_vision(graft):
    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=6)
    emb.freeze_lower_layers(1)
    trainable = {n for n, p in emb.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.lm.layers.0.") or "embed_tokens" in n for n in trainable)
    assert any(n.startswith("backbone.lm.layers.1.") for n in trainable)
    assert any(n.startswith("backbone.projector.") for n in trainable)
    assert not any(n.startswith("backbone.vision.") for n in trainable)  # frozen by default
    with pytest.raises(Exception, match="freeze_lower_layers=5"):
        emb.freeze_lower_layers(5)


def test_bad_graft_configs_are_refused_with_a_clear_message():
    from moon.errors import ConfigError

    with pytest.raises(ConfigError, match="square number"):
        MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", graft={"image_tokens": 3})
    with pytest.raises(ConfigError, match="unknown image encoder"):
        MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", graft={"image_encoder": "resnet-9000"})
    with pytest.raises(ConfigError, match="keep_layers=9"):
        MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", graft={"keep_layers": 9})
    with pytest.raises(ConfigError, match="unknown graft field"):
        MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", graft={"layers": 9})


def _images(tmp_path, n, tag="i"):
    from PIL import Image

    paths = []
    for i in range(n):
        p = tmp_path / f"{tag}{i}.png"
        Image.new("RGB", (40 + i, 30), (i * 17 % 256, 20, 200)).save(p)
        paths.append(str(p))
    return paths


def test_features_persist_on_disk_across_processes(tmp_path, monkeypatch):
    from moon.data import Product
    from moon.model import feature_store

    monkeypatch.setenv(feature_store.ENV, str(tmp_path / "cache"))
    paths = _images(tmp_path, 4)
    prods = [Product(f"p{i}", "mug", paths[2 * i : 2 * i + 2]) for i in range(2)]
    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=3)
    first = emb.encode_products(prods)
    key = emb.backbone.frozen_features.key()
    assert len(list((tmp_path / "cache" / key).rglob("*.npy"))) == 4
    # a new process: an empty in-memory cache and a new model with the same weights
    FEATURE_CACHE.entries.clear()
    again = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=3)
    calls = []
    hook = again.backbone.vision.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    second = again.encode_products(prods)
    hook.remove()
    assert calls == []  # every feature came from the disk
    np.testing.assert_array_equal(first, second)
    # a copy of an image elsewhere is the same content: a hit too
    FEATURE_CACHE.entries.clear()
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(Path(paths[0]).read_bytes())
    again.encode_products([Product("c", "mug", [str(copy)])])
    assert calls == []
    # unset: no disk store, features computed again
    monkeypatch.delenv(feature_store.ENV)
    FEATURE_CACHE.entries.clear()
    third = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=3)
    hook = third.backbone.vision.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    third.encode_products(prods)
    hook.remove()
    assert sum(calls) == 4


def test_encoding_batches_the_images_of_many_records_at_once(tmp_path):
    from moon.data import Product

    FEATURE_CACHE.entries.clear()
    paths = _images(tmp_path, 15, "b")
    prods = [Product(f"p{i}", "mug", paths[3 * i : 3 * i + 3]) for i in range(5)]
    emb = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=6)
    per_record = np.stack([emb.encode_products([p])[0] for p in prods])  # fills the cache one product at a time
    FEATURE_CACHE.entries.clear()
    calls = []
    hook = emb.backbone.vision.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    together = emb.encode_products(prods, batch_size=2)
    hook.remove()
    # full encoder batches across products (8 images each), not one batch of 3 per product
    assert calls == [8, 7]
    # the same features either way: batching the encoder changes no image's result beyond rounding
    np.testing.assert_allclose(together, per_record, atol=1e-5)


def test_image_precision_is_a_switch_with_its_own_cache_namespace(tmp_path):
    paths = _images(tmp_path, 2, "q")
    fp32 = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=3)
    bf16 = MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", seed=3, graft={"image_precision": "bf16"})
    f32, f16 = fp32.backbone.frozen_features, bf16.backbone.frozen_features
    assert f32.key() != f16.key()  # bf16 features are never served for a float32 model
    a, b = f32(paths), f16(paths)
    assert not torch.equal(a, b)
    # bfloat16 keeps 8 significant bits: features agree to about 2^-8 relative per operation
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert bool((cos > 0.99).all()), cos
    with pytest.raises(ConfigError, match="image_precision"):
        MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu", graft={"image_precision": "fp16"})
