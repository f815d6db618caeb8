"""Damaged stores (issue #16): zero-byte, truncated and foreign parquet files, manifests with
wrong field types, null box values. `moon data validate` reports them (exit 1) and `moon data
stats` says one line (exit 2); neither prints a traceback."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon.data import Product, ProductStore, Purchase, Query, StoreError
from moon.data.store import BOX_SCHEMA, PRODUCT_SCHEMA, write_store


# ------------------------------------------------------------------ broken stores
@pytest.fixture
def good_store(tmp_path):
    products = [Product(id=f"p{i}", title=f"t{i}") for i in range(50)]
    queries = [Query(id=f"q{i}", text=f"q{i}", split="test") for i in range(50)]
    purchases = [Purchase(f"q{i}", f"p{i}", 0, "") for i in range(50)]
    return write_store(tmp_path / "store", products, queries, purchases).root


def _cli(argv, capsys):
    from moon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return exc.value.code, captured.err


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "not-parquet"])
def test_damaged_parquet_is_a_clear_error_in_validate_and_stats(good_store, capsys, damage):
    path = good_store / "products.parquet"
    data = path.read_bytes()
    path.write_bytes({"zero-byte": b"", "truncated": data[: len(data) // 2], "not-parquet": b"hello" * 100}[damage])
    report = ProductStore(good_store).validate()
    assert report.counts() == {"unreadable-file": 1}  # purchases are not called dangling
    code, err = _cli(["data", "validate", str(good_store)], capsys)
    assert code == 1 and "[unreadable-file] products.parquet" in err
    assert ("empty file (0 bytes" if damage == "zero-byte" else "unreadable parquet") in err
    code, err = _cli(["data", "stats", str(good_store)], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(StoreError, match="products.parquet"):
        ProductStore(good_store).products()


def test_parquet_with_wrong_column_type_is_refused(good_store, capsys):
    pq.write_table(pa.table({"id": ["p0"], "title": [3]}), good_store / "products.parquet")
    with pytest.raises(StoreError, match="column 'title' is int64, expected string"):
        ProductStore(good_store).products()
    code, err = _cli(["data", "validate", str(good_store)], capsys)
    assert code == 1 and "column 'title' is int64" in err


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"counts": "lots"}, "counts must be a mapping"),
        ({"counts": {"products": "lots"}}, "counts.products must be an integer >= 0, got 'lots'"),
        ({"counts": {"products": -5}}, "counts.products must be an integer >= 0"),
        ({"counts": {"products": 1.5}}, "counts.products must be an integer >= 0"),
        ({"counts": {"products": True}}, "counts.products must be an integer >= 0"),
        ({"counts": {"widgets": 1}}, "unknown table 'widgets'"),
        ({"version": "1"}, "version must be an integer"),
        ({"created": []}, "created must be a mapping"),
    ],
)
def test_manifest_with_bad_fields_is_refused(good_store, capsys, patch, message):
    manifest = json.loads((good_store / "manifest.json").read_text())
    manifest.update(patch)
    (good_store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ProductStore(good_store)
    code, err = _cli(["data", "validate", str(good_store)], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[" * 100_000, b"{}" + b" " * 10])
def test_unreadable_manifest_is_one_line(good_store, capsys, content):
    (good_store / "manifest.json").write_bytes(content)
    code, err = _cli(["data", "stats", str(good_store)], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_null_box_coordinates_and_nul_paths_are_reported(good_store):
    rows = [
        {"image": "images/a.png", "x0": None, "y0": 0.0, "x1": 1.0, "y1": 1.0, "source": "truth"},
        {"image": None, "x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0, "source": "truth"},
        {"image": "images/a\x00.png", "x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0, "source": "truth"},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=BOX_SCHEMA), good_store / "boxes.parquet")
    manifest = json.loads((good_store / "manifest.json").read_text())
    manifest["counts"]["boxes"] = 3
    (good_store / "manifest.json").write_text(json.dumps(manifest))
    report = ProductStore(good_store).validate()
    assert report.counts() == {"bad-value": 2, "missing-file": 1, "bad-path": 1}
    text = report.format()
    assert "missing coordinate" in text and "names no image" in text and "unusable path" in text


def test_schema_of_a_good_store_still_opens(good_store):
    assert len(ProductStore(good_store).products()) == 50 and PRODUCT_SCHEMA.names[0] == "id"
