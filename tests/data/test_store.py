"""The product store: round trips, validation of each kind of breakage, stats."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon.data import Box, Product, ProductStore, StoreError, StoreWriter, write_store
from moon.data.store import PRODUCT_SCHEMA, PURCHASE_SCHEMA, replace_boxes


def _write(tiny_records):
    root, products, queries, purchases, boxes = tiny_records
    return write_store(root, products, queries, purchases, boxes, created={"tool": "test"})


def test_round_trip_gives_identical_records(tiny_records):
    root, products, queries, purchases, boxes = tiny_records
    store = _write(tiny_records)
    assert store.products() == [
        Product(p.id, p.title, [str(x) for x in p.images], p.category, p.attributes, p.group) for p in products
    ]
    got_queries = store.queries()
    assert [(q.id, q.text, q.split, [str(x) for x in q.images]) for q in got_queries] == [
        (q.id, q.text, q.split, [str(x) for x in q.images]) for q in queries
    ]
    assert store.purchases() == purchases
    assert list(store.iter_boxes()) == boxes
    assert store.manifest["counts"] == {"products": 3, "queries": 3, "purchases": 3, "boxes": 1}
    assert store.product("p1").title == "Product 1 运动鞋"
    assert store.positives("train") == {"q0": {"p0"}}
    assert store.validate().ok


def test_paths_are_stored_relative(tiny_records):
    root = tiny_records[0]
    _write(tiny_records)
    images = pq.read_table(root / "products.parquet").column("images").to_pylist()
    assert images[0] == ["images/p0.png"]


def test_streaming_in_small_row_groups(tmp_path):
    with StoreWriter(tmp_path / "s", flush_every=7) as w:
        for i in range(50):
            w.add_product(Product(id=f"p{i}", title=f"t{i}"))
    assert pq.ParquetFile(tmp_path / "s" / "products.parquet").num_row_groups == 8
    store = ProductStore(tmp_path / "s")
    assert [p.id for p in store.iter_products(batch_size=5)] == [f"p{i}" for i in range(50)]


def test_interrupted_write_leaves_no_manifest(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s") as w:
            w.add_product(Product(id="p0", title="x"))
            raise RuntimeError("boom")
    with pytest.raises(StoreError, match="no manifest.json"):
        ProductStore(tmp_path / "s")


def test_refuses_to_overwrite_without_flag(tiny_records):
    _write(tiny_records)
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(tiny_records[0])


def test_overwrite_drops_tables_of_the_old_store(tiny_records):
    root, products, queries, purchases, boxes = tiny_records
    write_store(root, products, queries, purchases, boxes)
    store = write_store(root, products[:1], [], [], overwrite=True)
    assert not (root / "boxes.parquet").exists() and store.box_sources() == []
    assert store.validate().ok and store.manifest["counts"] == {"products": 1, "queries": 0, "purchases": 0}


def test_image_outside_store_is_refused(tmp_path):
    with pytest.raises(StoreError, match="outside the store"):
        write_store(tmp_path / "s", [Product(id="p", title="t", images=[tmp_path / "elsewhere.png"])])


def _rewrite(path, schema, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_validate_catches_each_kind_of_breakage(tiny_records):
    store = _write(tiny_records)
    root = store.root
    rows = pq.read_table(root / "products.parquet").to_pylist()
    rows.append(dict(rows[0]))  # duplicate id
    rows[1]["images"] = ["images/missing.png"]  # missing file
    rows[2]["category"] = ["a", "b", "c", "d", "e", "f"]  # too deep
    _rewrite(root / "products.parquet", PRODUCT_SCHEMA, rows)
    prow = pq.read_table(root / "purchases.parquet").to_pylist()
    prow.append({"query_id": "q-nope", "product_id": "p-nope", "timestamp": 0, "region": ""})
    _rewrite(root / "purchases.parquet", PURCHASE_SCHEMA, prow)
    report = ProductStore(root).validate()
    counts = report.counts()
    assert counts == {"duplicate-id": 1, "missing-file": 1, "bad-value": 1, "dangling-id": 2, "count-mismatch": 2}
    text = report.format()
    assert "products.parquet row 3" in text and "'p-nope'" in text and "images/missing.png" in text


def test_validate_catches_bad_split_and_bad_image(tiny_records):
    root, products, queries, purchases, _ = tiny_records
    queries[0].split = "dev"
    (root / "images" / "p2.png").write_bytes(b"garbage")
    store = write_store(root, products, queries, purchases)
    report = store.validate(check_images=True)
    assert report.counts() == {"bad-value": 1, "bad-image": 1}


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a product store"):
        ProductStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(StoreError, match="not a moon-store manifest"):
        ProductStore(tmp_path)


def test_stats(tiny_records):
    stats = _write(tiny_records).stats()
    assert stats["products"] == 3 and stats["queries"] == 3 and stats["purchases"] == 3
    assert stats["category_levels"] == 4
    assert stats["attribute_types"] == {"brand": {"products": 3, "values": 3}, "color": {"products": 3, "values": 3}}
    assert stats["images_per_product"]["mean"] == 1.0
    assert stats["query_modality"] == {"text": 1, "image": 1, "multimodal": 1}
    assert stats["purchases_by_split"] == {"test": 1, "train": 1, "val": 1}
    assert stats["duplicate_listings"] == {"groups": 1, "products": 2}


def test_replace_boxes_keeps_other_sources_and_attaches_crops(tiny_records):
    store = _write(tiny_records)
    root = store.root
    (root / "crops").mkdir()
    (root / "crops" / "c0.png").write_bytes((root / "images" / "p0.png").read_bytes())
    replace_boxes(root, "saliency", [Box("images/p0.png", 0, 0, 8, 8, source="saliency", crop="crops/c0.png")])
    replace_boxes(root, "saliency", [Box("images/p0.png", 0, 0, 9, 9, source="saliency", crop="crops/c0.png")])
    reopened = ProductStore(root, crop_source="saliency")
    assert reopened.box_sources() == ["saliency", "truth"]
    assert [b.x1 for b in reopened.iter_boxes("saliency")] == [9]
    assert reopened.manifest["counts"]["boxes"] == 2
    assert reopened.product("p0").crops == [str(root / "crops" / "c0.png")]
    assert reopened.product("p1").crops == []
    assert reopened.validate().ok


def test_crops_stay_aligned_with_images(tmp_path):
    root = tmp_path / "s"
    (root / "images").mkdir(parents=True)
    (root / "crops").mkdir()
    for name in ("a", "b", "cb"):
        (root / "images" / f"{name}.png").write_bytes(b"")
    two = Product(id="p", title="two", images=["images/a.png", "images/b.png"])
    write_store(root, [two], [], [], [Box("images/b.png", 0, 0, 4, 4, source="learned", crop="images/cb.png")])
    crops = ProductStore(root, crop_source="learned").product("p").crops
    assert crops == [None, str(root / "images" / "cb.png")]  # the crop sits next to the image it was cut from


def test_store_path_cannot_escape(tiny_records):
    store = _write(tiny_records)
    with pytest.raises(StoreError, match="escapes"):
        store.path("../../etc/passwd")
