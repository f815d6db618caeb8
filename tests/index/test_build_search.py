import json

import numpy as np
import pytest

from moon.data import Product, load_image
from moon.errors import ConfigError, DataError
from moon.index import (
    VectorIndex,
    add_products,
    build_index,
    build_index_from_vectors,
    make_query,
    read_manifest,
    recall_at_k,
    search,
)


def test_build_writes_manifest_and_finds_known_answers(tmp_path, toy_embedder, toy_store):
    index = build_index(toy_embedder, toy_store, tmp_path / "idx", model="toy")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format"] == "moon-index"
    assert manifest["kind"] == "exact" and manifest["count"] == 12 and manifest["dim"] == 16
    assert manifest["fingerprint"] == toy_embedder.fingerprint()
    assert manifest["store"] == str(toy_store.root) and manifest["recall_at_10"] == 1.0
    # generation 1 of the layout of moon.index.atomic: data files named by generation, the writers' lock
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        ".moon-index.lock",
        "ids.1.parquet",
        "manifest.json",
        "vectors.1.faiss",
    ]
    assert manifest["generation"] == 1 and manifest["files"]["vectors"]["name"] == "vectors.1.faiss"

    reopened = VectorIndex.open(tmp_path / "idx")
    assert reopened.ids() == index.ids() == toy_store.product_ids()
    hits = search(reopened, toy_embedder, make_query("red shoe"), k=3, store=toy_store)
    assert hits[0].id == "red-shoe" and hits[0].title == "red shoe" and hits[0].rank == 1
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    photo = load_image(toy_store.product("blue-bag").images[0])
    hits = search(reopened, toy_embedder, make_query("bag", [photo]), k=1, store=toy_store)
    assert hits[0].id == "blue-bag"


def test_scores_equal_exact_inner_products(tmp_path, toy_embedder, toy_store):
    index = build_index(toy_embedder, toy_store, tmp_path / "idx")
    products = toy_store.products()
    vectors = toy_embedder.encode_products(products)
    query = toy_embedder.encode_queries([make_query("green hat")])
    exact = dict(zip([p.id for p in products], (vectors @ query[0]).tolist(), strict=True))
    got = index.search(query, 5)[0]
    assert got[0].id == "green-hat"
    # the scores are the top-5 exact inner products, and each is the score of the id it names
    np.testing.assert_allclose([h.score for h in got], sorted(exact.values(), reverse=True)[:5], rtol=1e-5)
    np.testing.assert_allclose([h.score for h in got], [exact[h.id] for h in got], rtol=1e-5)


def test_refuses_to_overwrite_and_empty_query(tmp_path, toy_embedder, toy_store):
    build_index(toy_embedder, toy_store, tmp_path / "idx")
    with pytest.raises(ConfigError, match="already exists"):
        build_index(toy_embedder, toy_store, tmp_path / "idx")
    build_index(toy_embedder, toy_store, tmp_path / "idx", overwrite=True)
    with pytest.raises(ConfigError, match="query text"):
        make_query("   ")
    index = VectorIndex.open(tmp_path / "idx")
    with pytest.raises(ConfigError, match="between 1 and 100"):
        search(index, toy_embedder, make_query("x"), k=101)


def test_add_and_remove_really_change_the_index(tmp_path, toy_embedder, toy_store):
    index = build_index(toy_embedder, toy_store, tmp_path / "idx")
    assert index.remove(["red-shoe", "no-such-id"]) == 1
    index.save()
    index = VectorIndex.open(tmp_path / "idx")
    assert len(index) == 11 and "red-shoe" not in index
    assert all(h.id != "red-shoe" for h in index.search(toy_embedder.encode_queries([make_query("red shoe")]), 11)[0])
    assert read_manifest(tmp_path / "idx").count == 11

    added, replaced = add_products(index, toy_embedder, [toy_store.product("red-shoe"), toy_store.product("blue-hat")])
    assert (added, replaced) == (1, 1)
    index.save()
    index = VectorIndex.open(tmp_path / "idx")
    assert len(index) == 12 and sorted(index.ids()) == sorted(toy_store.product_ids())
    assert index.search(toy_embedder.encode_queries([make_query("red shoe")]), 1)[0][0].id == "red-shoe"


def test_add_refuses_a_different_model(tmp_path, toy_embedder, other_embedder, toy_store):
    index = build_index(toy_embedder, toy_store, tmp_path / "idx")
    with pytest.raises(ConfigError, match="fingerprint"):
        add_products(index, other_embedder, [Product(id="x", title="x")])


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_measure_recall_and_support_add_remove(tmp_path, kind):
    rng = np.random.default_rng(0)
    # clustered data: 20 centres, so approximate search has structure to find
    centres = rng.normal(size=(20, 32))
    vectors = (centres[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(len(vectors))]
    params = {"nlist": 16, "pq_m": 16, "nprobe": 16} if kind == "ivfpq" else None
    index = build_index_from_vectors(
        tmp_path / kind,
        ids,
        vectors,
        model="random-vectors",
        fingerprint="f",
        kind=kind,
        params=params,
        recall_queries=200,
    )
    manifest = read_manifest(tmp_path / kind)
    # 200 product vectors held out (a tenth at most) while measuring: tuned on 100, reported on 100
    assert manifest.kind == kind and manifest.recall_source == "held-out vectors"
    assert manifest.recall_queries == 100 and manifest.recall_count == 1800 and manifest.count == 2000
    # fresh queries from the same clusters get the recall the manifest states (within sampling error)
    fresh = (centres[rng.integers(0, 20, 300)] + 0.3 * rng.normal(size=(300, 32))).astype(np.float32)
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    truth = np.argsort(-(fresh @ vectors.T), axis=1)[:, :10]
    row_of = {label: int(pid[1:]) for label, pid in index._id_of.items()}
    approx = np.vectorize(lambda label: row_of.get(int(label), -1))(index.search_labels(fresh, 10))
    assert abs(manifest.recall_at_10 - recall_at_k(approx, truth, 10)) < 0.06
    assert manifest.recall_at_10 >= 0.9
    if kind == "hnsw":  # HNSW keeps full vectors: searching an indexed vector finds itself
        assert index.search(vectors[7:8], 1)[0][0].id == "v7"

    assert index.remove(["v7", "v8"]) == 2
    index.save()
    reopened = VectorIndex.open(tmp_path / kind)
    assert len(reopened) == 1998 and "v7" not in reopened
    found = {h.id for h in reopened.search(vectors[7:9], 50)[0]}
    assert "v7" not in found and "v8" not in found
    reopened.add(["v7"], vectors[7:8])
    assert len(reopened) == 1999 and "v7" in reopened


def test_auto_kind_and_bad_vectors(tmp_path):
    vectors = np.eye(4, dtype=np.float32)
    index = build_index_from_vectors(
        tmp_path / "a", list("abcd"), vectors, model="m", fingerprint="f", exact_limit=2, recall_queries=4
    )
    # 4 vectors: none can be held out of the index to measure it honestly, so no recall is claimed
    assert index.manifest.kind == "hnsw" and index.manifest.recall_at_10 is None
    assert index.manifest.recall_source is None and index.manifest.recall_queries == 0
    with pytest.raises(DataError, match="expected shape"):
        index.add(["e"], np.ones((1, 3), np.float32))
    with pytest.raises(DataError, match="NaN"):
        index.add(["e"], np.full((1, 4), np.nan, np.float32))
    with pytest.raises(DataError, match="duplicate"):
        index.add(["e", "e"], np.ones((2, 4), np.float32))


def test_open_reports_broken_directories(tmp_path, toy_embedder, toy_store):
    from moon.index import IndexFormatError

    with pytest.raises(IndexFormatError, match="no manifest.json"):
        VectorIndex.open(tmp_path)
    build_index(toy_embedder, toy_store, tmp_path / "idx")
    vectors_file = tmp_path / "idx" / read_manifest(tmp_path / "idx").files["vectors"]["name"]
    size = vectors_file.stat().st_size
    vectors_file.write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match=f"does not belong to this index .7 bytes; .* records {size:,} bytes"):
        VectorIndex.open(tmp_path / "idx")
