import pytest
from bench_helpers import COLOURS, OracleEmbedder, SpyEmbedder

from moon.bench import EmbeddingCache, evaluate, evaluate_retrieval, strip_labels
from moon.data import ProductStore
from moon.errors import ConfigError


def test_leakage_rule_products_lose_category_and_attributes(store_dir):
    spy = SpyEmbedder()
    result = evaluate(spy, store_dir, tasks=["classification", "attribute"])
    originals = {p.id: p for p in ProductStore(store_dir).products()}
    assert spy.product_calls, "classification tasks must encode products"
    for call in spy.product_calls:
        for p in call:
            assert p.category == [] and p.attributes == {}
            assert p.title == originals[p.id].title and p.images == originals[p.id].images
    labels = {q.text for call in spy.query_calls for q in call}
    assert {"Fashion", "Fashion > Shoes", "Fashion > Shoes > Sneakers", "color: red", "material: cotton"} <= labels
    assert [t.spec.name for t in result.tasks] == [
        "classification-l1",
        "classification-l2",
        "classification-l3",
        "attribute-color",
        "attribute-material",
    ]


def test_retrieval_sees_full_products(store_dir):
    spy = SpyEmbedder()
    evaluate(spy, store_dir, tasks=["product2product"])
    assert all(p.category for call in spy.product_calls for p in call)


def test_strip_labels_keeps_the_original():
    from moon.data import Product

    p = Product(id="a", title="t", images=["x.png"], category=["A"], attributes={"c": ["r"]})
    q = strip_labels(p)
    assert (q.category, q.attributes, q.title, q.images) == ([], {}, "t", ["x.png"])
    assert p.category == ["A"] and p.attributes == {"c": ["r"]}


def test_oracle_known_answers(store_dir):
    store = ProductStore(store_dir)
    oracle = OracleEmbedder(store.product_ids(), store.positives(), COLOURS)
    result = evaluate(oracle, store, split="test")
    t2p = result.task("text2product")
    # q0 bought p0 and p4 (one of two in the top 1), the three other text queries one product each
    assert t2p.n_queries == 4
    assert t2p.metrics["recall@1"] == pytest.approx((0.5 + 3) / 4)
    assert (
        t2p.metrics["recall@5"] == 1.0 and t2p.metrics["mrr@10"] == 1.0 and t2p.metrics["ndcg@10"] == pytest.approx(1.0)
    )
    for name in ("image2product", "multimodal2product"):
        assert result.task(name).metrics["recall@1"] == 1.0 and result.task(name).n_queries == 4
    assert result.task("attribute-color").metrics == {"accuracy": 1.0, "macro_f1": 1.0}
    # level 3 exists only for products with 3-level paths (Home > Garden has 2)
    assert result.task("classification-l3").n_queries == sum(len(p.category) >= 3 for p in store.products())
    assert result.task("classification-l1").n_candidates == 2
    p2p = result.task("product2product")
    assert p2p.n_queries == 7 and p2p.n_candidates == 15
    assert p2p.relevant[p2p.query_ids.index("p3")] == {"p9", "p12"}
    assert all(qid not in ranked for qid, ranked in zip(p2p.query_ids, p2p.rankings, strict=True))


def test_evaluate_retrieval_pools_queries(store_dir):
    store = ProductStore(store_dir)
    oracle = OracleEmbedder(store.product_ids(), store.positives(), COLOURS)
    val = evaluate_retrieval(oracle, store, split="val")
    assert val["recall@10"] == 1.0 and val["n_queries"] == 4
    assert set(val) == {
        "recall@10",
        "n_queries",
        "text2product/recall@10",
        "image2product/recall@10",
        "multimodal2product/recall@10",
    }


def test_cache_reuses_embeddings(store_dir, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    spy = SpyEmbedder()
    first = evaluate(spy, store_dir, tasks=["retrieval", "attribute-color"], cache=cache)
    n_calls = len(spy.product_calls) + len(spy.query_calls)
    assert cache.misses == n_calls > 0 and cache.hits == 0
    second = evaluate(spy, store_dir, tasks=["retrieval", "attribute-color"], cache=cache)
    assert len(spy.product_calls) + len(spy.query_calls) == n_calls  # nothing re-encoded
    assert cache.hits == n_calls
    assert first.to_json()["tasks"] == second.to_json()["tasks"]
    other = SpyEmbedder()
    other.seed = 2  # another fingerprint: another cache entry
    evaluate(other, store_dir, tasks=["text2product"], cache=cache)
    assert other.query_calls


def test_bad_task_selection_is_a_config_error(store_dir):
    with pytest.raises(ConfigError, match="attribute-size"):
        evaluate(SpyEmbedder(), store_dir, tasks=["attribute-size"])
