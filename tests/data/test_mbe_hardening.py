"""Hostile input to `moon data import-mbe` (issue #16): every case feeds the bad bytes / file
itself. A bad row is reported (file:row and reason) and skipped, the good rows are kept, nothing
prints a traceback, and the full problem list lands in STORE/import-report.jsonl."""

import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moon.data import ProductStore, mbe
from moon.data.mbe import LIMITS, REPORT_FILE, QueryColumns, import_mbe, parse_attributes
from moon.errors import DataError

GOOD = [
    {"id": "g1", "doc_title": "Red mug", "doc_industry_name": "Home", "doc_attributes": "color:red"},
    {"id": "g2", "doc_title": "Blue cup", "doc_industry_name": "Home", "doc_attributes": ""},
]
CSV_KEYS = ["id", "doc_title", "doc_image", "doc_industry_name", "doc_attributes"]


def _jsonl_line(row) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def _csv_line(cells) -> bytes:
    import io

    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    return buf.getvalue().encode()


def _good_csv_rows() -> list[bytes]:
    return [_csv_line([r.get(k, "") for k in CSV_KEYS]) for r in GOOD]


def _ids(store) -> list[str]:
    return [p.id for p in store.products()]


def _problems(store) -> list[dict]:
    return [json.loads(line) for line in (store.root / REPORT_FILE).read_text(encoding="utf-8").splitlines()]


def _no_reprs(store):
    """No list/bytes value was stored as its Python repr."""
    for p in store.products():
        for text in [p.id, p.title, *p.category, *p.attributes, *(v for vs in p.attributes.values() for v in vs)]:
            assert not text.startswith(("[", "b'", 'b"', "{", "(")), text


# ------------------------------------------------------------------ bytes that are not UTF-8
def test_non_utf8_byte_in_jsonl_skips_only_its_row(tmp_path):
    src = tmp_path / "mbe.jsonl"
    bad = _jsonl_line({"id": "b1", "doc_title": "XX"}).replace(b"XX", b"caf\xe9")  # latin-1 é
    src.write_bytes(_jsonl_line(GOOD[0]) + bad + _jsonl_line(GOOD[1]))
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1", "g2"]
    assert report.skipped_rows == ["mbe.jsonl:2: not UTF-8 (byte 0xe9 at offset 30 of the line)"]
    assert store.validate().ok


def test_non_utf8_byte_in_csv_skips_only_its_row(tmp_path):
    src = tmp_path / "mbe.csv"
    bad = _csv_line(["b1", "XX", "", "Home", ""]).replace(b"XX", b"caf\xe9")
    good = _good_csv_rows()
    src.write_bytes(_csv_line(CSV_KEYS) + good[0] + bad + good[1])
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1", "g2"]
    assert report.skipped_rows == ["mbe.csv:2: doc_title: byte 0xe9 at character 3 is not UTF-8"]


def test_lone_surrogate_escape_in_json_is_a_bad_row(tmp_path):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line(GOOD[0]) + b'{"id": "s1", "doc_title": "a\\ud800b"}\n')
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1"]
    assert report.skipped_rows == ["mbe.jsonl:2: doc_title: a lone surrogate (U+D800) at character 1"]


# ------------------------------------------------------------------ huge fields and lines
def test_csv_field_over_pythons_131072_limit_is_read_and_cut(tmp_path):
    src = tmp_path / "mbe.csv"
    long_title = "t" * 200_000
    good = _good_csv_rows()
    src.write_bytes(_csv_line(CSV_KEYS) + good[0] + _csv_line(["big", long_title, "", "Home", ""]) + good[1])
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1", "big", "g2"] and not report.skipped_rows
    assert store.product("big").title == "t" * LIMITS["title"]
    assert report.truncated == [f"mbe.csv:2: doc_title cut from 200,000 to {LIMITS['title']:,} characters"]


def test_csv_field_over_moons_limit_is_a_bad_row(tmp_path, monkeypatch):
    monkeypatch.setattr(mbe, "MAX_CSV_FIELD", 1_000)
    monkeypatch.setattr(mbe, "MAX_LINE", 10_000)
    src = tmp_path / "mbe.csv"
    good = _good_csv_rows()
    src.write_bytes(_csv_line(CSV_KEYS) + good[0] + _csv_line(["big", "t" * 5_000, "", "", ""]) + good[1])
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1", "g2"]
    assert len(report.skipped_rows) == 1
    assert report.skipped_rows[0].startswith("mbe.csv:2: unreadable CSV row (field larger than field limit")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_line_over_the_line_limit_is_dropped_in_pieces(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(mbe, "MAX_LINE", 4_096)
    monkeypatch.setattr(mbe, "MAX_CSV_FIELD", 4_096)
    src = tmp_path / f"mbe.{fmt}"
    if fmt == "jsonl":
        data = _jsonl_line(GOOD[0]) + _jsonl_line({"id": "big", "doc_title": "t" * 10_000}) + _jsonl_line(GOOD[1])
    else:
        good = _good_csv_rows()
        data = _csv_line(CSV_KEYS) + good[0] + _csv_line(["big", "t" * 10_000, "", "", ""]) + good[1]
    src.write_bytes(data)
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1", "g2"]
    unit = "bytes" if fmt == "jsonl" else "characters"
    assert report.skipped_rows == [f"mbe.{fmt}:2: line longer than 4,096 {unit}"]


def test_50_mb_title_is_cut_with_a_warning(tmp_path):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line(GOOD[0]) + _jsonl_line({"id": "huge", "doc_title": "x" * 50_000_000}))
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1", "huge"]
    assert len(store.product("huge").title) == LIMITS["title"]
    assert report.truncated == [f"mbe.jsonl:2: doc_title cut from 50,000,000 to {LIMITS['title']:,} characters"]
    assert "warning: text cut to its length limit: 1" in report.format()
    assert os.path.getsize(store.root / "products.parquet") < 100_000
    assert {"kind": "truncated", "message": report.truncated[0]} in _problems(store)


def test_huge_integer_is_a_bad_row(tmp_path):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line(GOOD[0]) + b'{"id": ' + b"9" * 5_000 + b', "doc_title": "x"}\n')
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1"]
    assert report.skipped_rows[0].startswith("mbe.jsonl:2: invalid JSON (Exceeds the limit")


# ------------------------------------------------------------------ deep nesting
def test_200k_deep_json_line_is_a_bad_row(tmp_path):
    src = tmp_path / "mbe.jsonl"
    deep = b'{"id": "d", "doc_title": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n"
    src.write_bytes(_jsonl_line(GOOD[0]) + deep + _jsonl_line(GOOD[1]))
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1", "g2"]
    assert report.skipped_rows == ["mbe.jsonl:2: JSON nested too deeply"]


def test_200k_deep_json_file_is_one_line_error(tmp_path, capsys):
    src = tmp_path / "mbe.json"
    src.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(DataError, match="JSON nested too deeply"):
        import_mbe([str(src)], tmp_path / "s")
    from moon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["data", "import-mbe", str(src), "--out", str(tmp_path / "s2")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {src}: JSON nested too deeply"


def test_deep_nesting_inside_an_image_list_string_is_not_a_crash(tmp_path):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line({"id": "i", "doc_title": "t", "doc_image": "[" * 100_000}))
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["i"] and store.product("i").images == []
    assert len(report.missing_images) == 1 and "longer than" in report.missing_images[0]


# ------------------------------------------------------------------ wrong types
@pytest.mark.parametrize(
    "column, value, reason",
    [
        ("id", ["a", "b"], "id is a list (['a', 'b']), expected text"),
        ("doc_title", ["a", "b"], "doc_title is a list (['a', 'b']), expected text"),
        ("doc_title", {"zh": "杯子"}, "doc_title is a dict ({'zh': '杯子'}), expected text"),
        ("doc_cate1_name", ["Kitchen"], "doc_cate1_name is a list (['Kitchen']), expected text"),
        ("doc_attributes", ["color:red"], "doc_attributes is a list (['color:red']), expected text"),
        ("doc_attributes", {"color": [["red"]]}, "attribute 'color' is a list (['red']), expected text"),
        ("doc_title", True, "doc_title is a bool (True), expected text"),
    ],
)
def test_lists_where_strings_belong_are_bad_rows_not_reprs(tmp_path, column, value, reason):
    src = tmp_path / "mbe.jsonl"
    row = {"id": "w", "doc_title": "t", **{column: value}}
    src.write_bytes(_jsonl_line(GOOD[0]) + _jsonl_line(row))
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["g1"]
    assert report.skipped_rows == [f"mbe.jsonl:2: {reason}"]
    _no_reprs(store)


def test_attributes_as_a_json_mapping_of_text_are_kept(tmp_path):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line({"id": "m", "doc_title": "t", "doc_attributes": {"color": ["red", ""], "size": "L"}}))
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert store.product("m").attributes == {"color": ["red"], "size": ["L"]} and not report.skipped_rows


def test_parquet_binary_and_list_columns(tmp_path):
    src = tmp_path / "mbe.parquet"
    table = pa.table(
        {
            "id": pa.array([b"p1", b"p2", b"p3"], pa.binary()),
            "doc_title": pa.array(["运动鞋".encode(), b"\xff\xfe", b"ok"], pa.binary()),
            "doc_cate1_name": pa.array([None, None, ["A", "B"]], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, src)
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["p1"]
    assert store.product("p1").title == "运动鞋"  # binary that is UTF-8 is text, not "b'...'"
    assert report.skipped_rows == [
        "mbe.parquet:2: doc_title is binary, not UTF-8 text (byte 0xff)",
        "mbe.parquet:3: doc_cate1_name is a list (['A', 'B']), expected text",
    ]
    _no_reprs(store)


def test_attribute_bomb_is_refused_quickly(tmp_path):
    assert len(parse_attributes("k:" + "!!!".join(f"v{i}" for i in range(256)))["k"]) == 256
    with pytest.raises(ValueError, match="more than 256 attribute values"):
        parse_attributes("k:" + "v!!!" * 2_000_000)  # would be quadratic if split in full
    with pytest.raises(ValueError, match="more than 256 attribute values"):
        parse_attributes(",,".join(f"k{i}:v" for i in range(1_000)))
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line({"id": "a", "doc_title": "t", "doc_attributes": "k:" + "v!!!" * 100_000}))
    _, report = import_mbe([str(src)], tmp_path / "s")
    assert report.skipped_rows == ["mbe.jsonl:1: unreadable attributes (more than 256 attribute values)"]


# ------------------------------------------------------------------ image paths
@pytest.fixture
def outside_layout(tmp_path):
    """data/mbe.jsonl and data/imgs/ (--images); secret.png sits next to data/, outside both."""
    data = tmp_path / "data"
    imgs = data / "imgs"
    imgs.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "secret.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(imgs / "inside.png")
    (imgs / "link.png").symlink_to(tmp_path / "secret.png")
    rows = [
        {"id": "up", "doc_title": "t", "doc_image": "../../secret.png"},
        {"id": "abs", "doc_title": "t", "doc_image": str(tmp_path / "secret.png")},
        {"id": "url", "doc_title": "t", "doc_image": f"file://{tmp_path / 'secret.png'}"},
        {"id": "sym", "doc_title": "t", "doc_image": "link.png"},
        {"id": "in", "doc_title": "t", "doc_image": "inside.png"},
    ]
    src = data / "mbe.jsonl"
    src.write_bytes(b"".join(_jsonl_line(r) for r in rows))
    return tmp_path, src, imgs


def test_image_paths_outside_images_are_not_copied(outside_layout):
    tmp, src, imgs = outside_layout
    store, report = import_mbe([str(src)], tmp / "s", images_dir=imgs)
    assert _ids(store) == ["up", "abs", "url", "sym", "in"]  # the products are kept ...
    assert [p.id for p in store.products() if p.images] == ["in"]  # ... without the outside images
    assert len(report.missing_images) == 4
    assert all("lies outside" in m and "--allow-outside-images" in m for m in report.missing_images)
    assert len(list((store.root / "images" / "mbe").iterdir())) == 1


def test_allow_outside_images_copies_them(outside_layout, capsys):
    tmp, src, imgs = outside_layout
    from moon.cli import main

    main(["data", "import-mbe", str(src), "--out", str(tmp / "s"), "--images", str(imgs), "--allow-outside-images"])
    store = ProductStore(tmp / "s")
    assert all(p.images for p in store.products())
    assert "images not available" not in capsys.readouterr().out


def test_inside_file_of_the_same_name_wins_over_dot_dot(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (8, 8), (1, 1, 1)).save(tmp_path / "x.png")
    Image.new("RGB", (8, 8), (7, 7, 7)).save(imgs / "x.png")
    src = tmp_path / "sub" / "mbe.jsonl"
    src.parent.mkdir()
    src.write_bytes(_jsonl_line({"id": "a", "doc_title": "t", "doc_image": "../x.png"}))
    store, report = import_mbe([str(src)], tmp_path / "s", images_dir=imgs)
    [path] = store.product("a").images
    assert Image.open(path).getpixel((0, 0)) == (7, 7, 7) and not report.missing_images


@pytest.mark.parametrize("ref, reason", [("a\x00b.png", "file not found"), ("x" * 300 + ".png", "unusable path (")])
def test_unusable_image_path_is_reported_not_raised(tmp_path, ref, reason):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line({"id": "a", "doc_title": "t", "doc_image": ref}))
    store, report = import_mbe([str(src)], tmp_path / "s", images_dir=tmp_path)
    assert _ids(store) == ["a"]
    assert len(report.missing_images) == 1
    assert reason in report.missing_images[0]


# ------------------------------------------------------------------ the full report
def test_every_bad_row_is_in_the_report_file(tmp_path, capsys):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(_jsonl_line(GOOD[0]) + b"".join(_jsonl_line({"id": f"n{i}"}) for i in range(30)))
    from moon.cli import main

    main(["data", "import-mbe", str(src), "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "skipped rows: 30" in out and "… 10 more" in out and f"listed in {tmp_path / 's' / REPORT_FILE}" in out
    store = ProductStore(tmp_path / "s")
    problems = _problems(store)
    assert [p["message"] for p in problems] == [f"mbe.jsonl:{i + 2}: product 'n{i}' has no title" for i in range(30)]
    assert {p["kind"] for p in problems} == {"skipped-row"}
    assert store.manifest["created"]["report"] == {
        "skipped_rows": 30,
        "missing_images": 0,
        "truncated": 0,
        "file": REPORT_FILE,
    }


def test_good_import_writes_an_empty_report(tmp_path):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(b"".join(_jsonl_line(r) for r in GOOD))
    store, report = import_mbe([str(src)], tmp_path / "s", query_columns=QueryColumns.parse("text=doc_title"))
    assert (store.root / REPORT_FILE).read_text() == "" and "listed in" not in report.format()
    assert store.validate().ok


def test_ten_thousand_images_in_one_cell_keep_the_first_64(tmp_path):
    src = tmp_path / "mbe.jsonl"
    src.write_bytes(
        _jsonl_line({"id": "a", "doc_title": "t", "doc_image": "|".join(f"i{i}.png" for i in range(10_000))})
    )
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert _ids(store) == ["a"]
    assert report.truncated == ["mbe.jsonl:1: doc_image lists more than 64 images; the first 64 kept"]
    assert len(report.missing_images) == 64
