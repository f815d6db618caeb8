import numpy as np
import pytest
import torch

from moon.bench import evaluate
from moon.data import ProductStore
from moon.errors import ConfigError
from moon.models import load_embedder

SMALL_DUAL = {"dim": 32, "hidden": 32, "layers": 1, "heads": 2, "image_size": 32, "max_text_len": 48}


def _infonce_steps(model, store, steps):
    """A few optimizer steps of one-way InfoNCE query → purchased product; returns the losses."""
    positives = store.positives("test")
    queries = [q for q in store.queries("test") if q.id in positives]
    by_id = {p.id: p for p in store.products()}
    products = [by_id[sorted(positives[q.id])[0]] for q in queries]
    q_batch = model.collate(model.build_query_inputs(queries))
    p_batch = model.collate(model.build_product_inputs(products))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        logits = model.forward(q_batch) @ model.forward(p_batch).T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(queries))) + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_random_is_deterministic_and_normalised(store_dir):
    store = ProductStore(store_dir)
    a = load_embedder("random").encode_products(store.products())
    b = load_embedder("random:0").encode_products(store.products())
    c = load_embedder("random:1").encode_products(store.products())
    assert a.shape == (16, 256) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="integer seed"):
        load_embedder("random:abc")


def test_dual_encoder_end_to_end_save_load_and_training(store_dir, tmp_path):
    store = ProductStore(store_dir)
    model = load_embedder("dual-encoder", overrides=SMALL_DUAL)
    again = load_embedder("dual-encoder", trainable=True, overrides=SMALL_DUAL)
    assert model.fingerprint() == again.fingerprint()  # seeded init
    result = evaluate(model, store)
    assert {t.spec.name for t in result.tasks} >= {
        "text2product",
        "product2product",
        "classification-l1",
        "attribute-color",
    }
    for t in result.tasks:
        assert all(v is not None and 0.0 <= v <= 1.0 for v in t.metrics.values()), t.spec.name

    losses = _infonce_steps(model, store, 8)
    assert losses[-1] < losses[0] - 0.5

    model.save_pretrained(str(tmp_path / "de"))
    loaded = load_embedder(str(tmp_path / "de"))
    assert type(loaded).__name__ == "DualEncoder" and loaded.fingerprint() == model.fingerprint()
    np.testing.assert_array_equal(loaded.encode_queries(store.queries()), model.encode_queries(store.queries()))
    also = load_embedder(f"dual-encoder:{tmp_path / 'de'}")
    np.testing.assert_array_equal(also.encode_products(store.products()), model.encode_products(store.products()))
    assert not list(tmp_path.glob("de/*.bin")) and not list(tmp_path.glob("de/*.pt"))  # safetensors only


def test_dual_encoder_batch_invariance_and_fusion(store_dir):
    store = ProductStore(store_dir)
    model = load_embedder("dual-encoder", overrides=SMALL_DUAL)
    products = store.products()
    together = model.encode_products(products, batch_size=16)
    alone = np.stack([model.encode_products([p])[0] for p in products[:4]])
    np.testing.assert_allclose(together[:4], alone, atol=1e-5)
    image_only = [q for q in store.queries() if q.modality == "image"][:1]
    batch = model.collate(model.build_query_inputs(image_only))
    with torch.no_grad():
        fused = model.forward(batch)
        direct = model.image_tower(batch["pixels"]).mean(0, keepdim=True)
    np.testing.assert_allclose(fused.numpy(), torch.nn.functional.normalize(direct, dim=-1).numpy(), atol=1e-5)


def test_default_dual_encoder_size():
    counts = load_embedder("dual-encoder", trainable=True).parameter_counts()
    assert 3_000_000 < counts["non_embedding"] < 5_000_000


@pytest.mark.slow
def test_pretrained_towers_end_to_end(store_dir, tmp_path):
    store = ProductStore(store_dir)
    model = load_embedder("pretrained-towers", overrides={"image_size": 64, "dim": 64})
    assert sum(p.numel() for p in model.parameters()) == (1280 + 1) * 64 + (384 + 1) * 64  # heads only
    result = evaluate(model, store, tasks=["retrieval", "attribute-color", "classification-l1"])
    assert all(t.main_score is not None for t in result.tasks)
    losses = _infonce_steps(model, store, 10)
    assert losses[-1] < losses[0] - 0.5
    model.save_pretrained(str(tmp_path / "pt"))
    loaded = load_embedder(str(tmp_path / "pt"))
    np.testing.assert_allclose(
        loaded.encode_products(store.products()), model.encode_products(store.products()), atol=1e-6
    )


def test_external_adapters_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="open_clip"):
        load_embedder("open-clip:ViT-B-32@laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match="GME"):
        load_embedder(f"gme:{tmp_path}")
    with pytest.raises(ConfigError, match="unknown option"):
        load_embedder("dual-encoder", trainable=True, overrides={"hiden": 3})
