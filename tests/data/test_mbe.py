"""MBE import: attribute parsing, bad rows, images, file formats, stats of the result."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moon.data.mbe import QueryColumns, import_mbe, parse_attributes
from moon.errors import ConfigError


def test_parse_attributes_examples():
    assert parse_attributes("color:white,,brand:nike") == {"color": ["white"], "brand": ["nike"]}
    assert parse_attributes(" color : red!!!blue ,, ,,size: XL ") == {"color": ["red", "blue"], "size": ["XL"]}
    assert parse_attributes("ratio:16:9,,color:red,,color:red!!!green") == {
        "ratio": ["16:9"],
        "color": ["red", "green"],
    }
    assert parse_attributes("") == {} and parse_attributes(None) == {} and parse_attributes("nan") == {}
    assert parse_attributes("empty:,,k:v") == {"k": ["v"]}
    with pytest.raises(ValueError):
        parse_attributes("no separator here")
    with pytest.raises(ValueError):
        parse_attributes(":value")


def test_query_columns_parse():
    qc = QueryColumns.parse("text=query, image=qimg|qimg2, product=pid, timestamp=ts")
    assert (qc.text, qc.images, qc.product, qc.timestamp) == ("query", ["qimg", "qimg2"], "pid", "ts")
    assert QueryColumns.parse(None) is None
    with pytest.raises(ConfigError, match="KEY=COLUMN"):
        QueryColumns.parse("text")
    with pytest.raises(ConfigError, match="text column and/or an image"):
        QueryColumns.parse("product=id")


@pytest.fixture
def mbe_files(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(imgs / "a1.jpg")
    Image.new("RGB", (20, 20), (0, 200, 0)).save(imgs / "b2.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    rows = [
        {
            "id": "0a1f",
            "doc_title": "Nike Air white sneaker",
            "doc_image": "https://img.example.com/x/a1.jpg",
            "doc_industry_name": "Fashion",
            "doc_cate1_name": "Shoes",
            "doc_cate2_name": "",
            "doc_cate3_name": "Sneakers",
            "doc_cate4_name": None,
            "doc_attributes": "color:white,,brand:nike",
            "query": "white nike shoes",
        },
        {"id": "", "doc_title": "no id", "doc_image": "", "doc_attributes": ""},
        {"id": "0b2e", "doc_title": "", "doc_image": "b2.png", "doc_attributes": ""},
        {
            "id": "0c3d",
            "doc_title": "Mug",
            "doc_image": "b2.png",
            "doc_industry_name": "Home",
            "doc_attributes": "material ceramic",
            "query": "mug",
        },
        {
            "id": "0d4c",
            "doc_title": "Cup",
            "doc_image": str(imgs / "broken.jpg"),
            "doc_industry_name": "Home",
            "doc_cate1_name": "Kitchen",
            "doc_attributes": "material:glass!!!steel",
            "query": "glass cup",
        },
        {
            "id": "0e5b",
            "doc_title": "Lamp",
            "doc_image": "https://img.example.com/none.jpg",
            "doc_industry_name": "Home",
            "doc_attributes": "",
            "query": "lamp",
        },
        {
            "id": "0a1f",
            "doc_title": "Nike Air white sneaker",
            "doc_image": "https://img.example.com/x/a1.jpg",
            "doc_industry_name": "Fashion",
            "doc_cate1_name": "Shoes",
            "doc_cate2_name": "",
            "doc_cate3_name": "Sneakers",
            "doc_cate4_name": None,
            "doc_attributes": "color:white,,brand:nike",
            "query": "nike sneaker",
        },
        {"id": "0a1f", "doc_title": "Something else", "doc_image": "", "doc_attributes": "", "query": "x"},
    ]
    return tmp_path, imgs, rows


def _check_import(store, report):
    assert [p.id for p in store.products()] == ["0a1f", "0d4c", "0e5b"]
    first = store.product("0a1f")
    assert first.category == ["Fashion", "Shoes", "Sneakers"]
    assert first.attributes == {"color": ["white"], "brand": ["nike"]}
    assert len(first.images) == 1
    assert store.product("0d4c").images == [] and store.product("0d4c").attributes == {"material": ["glass", "steel"]}
    assert report.products == 3 and report.images == 1
    skipped = "\n".join(report.skipped_rows)
    assert ":2: no id" in skipped
    assert ":3: product '0b2e' has no title" in skipped
    assert ":4: unreadable attributes" in skipped
    assert ":8: duplicate id '0a1f' with different content" in skipped
    assert len(report.skipped_rows) == 4
    missing = "\n".join(report.missing_images)
    assert "broken.jpg" in missing and "none.jpg" in missing and len(report.missing_images) == 2
    assert store.validate().ok


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_import_each_format(mbe_files, fmt):
    tmp, imgs, rows = mbe_files
    src = tmp / f"mbe.{fmt}"
    if fmt == "jsonl":
        src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "json":
        src.write_text(json.dumps(rows))
    elif fmt == "csv":
        keys = sorted({k for r in rows for k in r})
        with src.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    else:
        keys = sorted({k for r in rows for k in r})
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), src)
    store, report = import_mbe(
        [f"train={src}"], tmp / f"store-{fmt}", images_dir=imgs, query_columns=QueryColumns.parse("text=query")
    )
    _check_import(store, report)
    queries = store.queries()
    assert [q.text for q in queries] == ["white nike shoes", "glass cup", "lamp", "nike sneaker"]
    assert {q.split for q in queries} == {"train"}
    assert store.positives() == {
        "q00000000": {"0a1f"},
        "q00000001": {"0d4c"},
        "q00000002": {"0e5b"},
        "q00000003": {"0a1f"},
    }
    stats = store.stats()
    assert stats["category_levels"] == 3 and stats["query_modality"] == {"text": 4}


def test_import_without_query_columns_has_products_only(mbe_files):
    tmp, imgs, rows = mbe_files
    src = tmp / "mbe.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    store, report = import_mbe([str(src)], tmp / "s", images_dir=imgs)
    assert store.manifest["counts"]["queries"] == 0
    assert any(":9: invalid JSON" in s for s in report.skipped_rows)


def test_identical_images_are_stored_once(mbe_files):
    tmp, imgs, _ = mbe_files
    rows = [
        {"id": "1", "doc_title": "a", "doc_image": "a1.jpg"},
        {"id": "2", "doc_title": "b", "doc_image": f"file://{imgs / 'a1.jpg'}"},
    ]
    src = tmp / "two.json"
    src.write_text(json.dumps(rows))
    store, report = import_mbe([str(src)], tmp / "s2", images_dir=imgs)
    assert store.product("1").images == store.product("2").images
    assert len(list((store.root / "images" / "mbe").iterdir())) == 1
