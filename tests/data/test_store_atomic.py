"""Store writes never destroy data (issue: data loss in the store writer / MBE importer).

Every test feeds the bad input itself: a source file named like a store table inside ``--out``, an
``--overwrite`` import whose source cannot be read, a write killed with SIGKILL halfway, a folder
that is not a store (a user's own ``products.parquet``, an index), CSV / JSONL / JSON files that
start with a UTF-8 byte-order mark. The writer stages everything in ``OUT/.moon-tmp-…/`` and moves
the finished store into place only when the whole write succeeded."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moon.data import Product, ProductStore, StoreError, StoreWriter, write_store
from moon.data.mbe import REPORT_FILE, QueryColumns, import_mbe
from moon.errors import DataError

STAGING_PREFIX = ".moon-tmp-"  # the writer's staging folders: OUT/.moon-tmp-<pid>-<random>/

MOON = [sys.executable, "-c", "from moon.cli import main; main()"]

OLD = [
    {"id": "old1", "doc_title": "Red mug", "doc_industry_name": "Home", "doc_image": "mug.png", "query": "red mug"},
    {"id": "old2", "doc_title": "Blue cup", "doc_industry_name": "Home", "doc_image": "", "query": "blue cup"},
]
NEW = [
    {"id": "new1", "doc_title": "Green lamp", "doc_industry_name": "Home", "doc_image": "", "query": "lamp"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _snapshot(root):
    """Every table's rows, the manifest and the report: what must not change."""
    out = {}
    for name in ("products", "queries", "purchases", "boxes"):
        path = root / f"{name}.parquet"
        out[name] = pq.read_table(path).to_pylist() if path.exists() else None
    out["manifest"] = (root / "manifest.json").read_bytes()
    out["report"] = (root / REPORT_FILE).read_bytes() if (root / REPORT_FILE).exists() else None
    return out


def _no_staging_left(root):
    return not [p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX)]


@pytest.fixture
def old_store(tmp_path):
    """An MBE import with an image, a query and a purchase per row, at ``tmp_path/store``."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(src_dir / "mug.png")
    src = _jsonl(src_dir / "old.jsonl", OLD)
    root = tmp_path / "store"
    store, _ = import_mbe([str(src)], root, query_columns=QueryColumns.parse("text=query"))
    assert [p.id for p in store.products()] == ["old1", "old2"] and store.validate().ok
    (image,) = store.product("old1").images  # copied into the store, not left in the staging folder
    assert image.startswith(str(store.root / "images" / "mbe")) and os.path.isfile(image)
    assert (root / REPORT_FILE).is_file()
    return root


def _run_cli(*args, cwd):
    return subprocess.run([*MOON, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _error_line(out) -> str:
    """The one ``error:`` line of a failed command (a progress line may come before it)."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


# ------------------------------------------------------------ (a) a source is never deleted
def test_source_named_products_parquet_in_the_out_folder_survives(tmp_path):
    """The reported repro: ``cd x && moon data import-mbe products.parquet --out .`` deleted the
    user's file and then said it did not exist."""
    x = tmp_path / "x"
    x.mkdir()
    pq.write_table(pa.Table.from_pylist(NEW), x / "products.parquet")
    before = (x / "products.parquet").read_bytes()
    for extra in ([], ["--overwrite"]):
        out = _run_cli("data", "import-mbe", "products.parquet", "--out", ".", "--query-columns", "text=query", *extra,
                       cwd=x)  # fmt: skip
        error = _error_line(out)
        assert "products.parquet" in error
        assert (x / "products.parquet").read_bytes() == before
        assert sorted(p.name for p in x.iterdir()) == ["products.parquet"]  # nothing else written
    assert "source" in error  # with --overwrite: refused because the source is an output


def test_source_that_is_the_stores_own_table_is_refused_even_with_overwrite(old_store):
    """Re-importing a store's own ``products.parquet`` into that store (or via a symlink to it)."""
    before = _snapshot(old_store)
    link = old_store.parent / "link.parquet"
    link.symlink_to(old_store / "products.parquet")
    for src in (old_store / "products.parquet", link):
        with pytest.raises(StoreError, match="this source is the products.parquet that writing the store into"):
            import_mbe([str(src)], old_store, overwrite=True)
    assert _snapshot(old_store) == before and _no_staging_left(old_store)


def test_a_users_products_parquet_in_a_non_store_folder_is_not_replaced(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    pq.write_table(pa.table({"whatever": [1, 2, 3]}), folder / "products.parquet")
    before = (folder / "products.parquet").read_bytes()
    src = _jsonl(tmp_path / "new.jsonl", NEW)
    with pytest.raises(StoreError, match=r"holds products.parquet but is not a product store .*--overwrite"):
        import_mbe([str(src)], folder)
    with pytest.raises(StoreError, match="not a product store"):
        write_store(folder, [Product(id="p", title="t")])
    assert (folder / "products.parquet").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["products.parquet"]


def test_an_index_folder_is_not_overwritten_by_a_store(tmp_path):
    index = tmp_path / "idx"
    index.mkdir()
    manifest = json.dumps({"format": "moon-index", "version": 2, "count": 3})
    (index / "manifest.json").write_text(manifest)
    (index / "vectors.faiss").write_bytes(b"\0" * 64)
    src = _jsonl(tmp_path / "new.jsonl", NEW)
    with pytest.raises(StoreError, match="its manifest.json is an index"):
        import_mbe([str(src)], index)
    out = _run_cli("data", "import-mbe", str(src), "--out", str(index), cwd=tmp_path)
    assert "an index" in _error_line(out)
    assert (index / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in index.iterdir()) == ["manifest.json", "vectors.faiss"]


# ------------------------------------------------ (b) a failed --overwrite keeps the old store
def _truncated_parquet(path):
    pq.write_table(pa.Table.from_pylist(NEW * 50), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _deep_json(path):
    path.write_text('{"data": ' + "[" * 10_000 + "]" * 10_000 + "}")


@pytest.mark.parametrize(
    "name, make, message",
    [("new.parquet", _truncated_parquet, "unreadable parquet"), ("new.json", _deep_json, "nested too deeply")],
    ids=["truncated-parquet", "10k-deep-json"],
)
def test_failed_overwrite_import_leaves_the_old_store(old_store, tmp_path, name, make, message):
    before = _snapshot(old_store)
    src = tmp_path / name
    make(src)
    with pytest.raises(DataError, match=message):
        import_mbe([str(_jsonl(tmp_path / "good.jsonl", NEW)), str(src)], old_store, overwrite=True)
    assert _snapshot(old_store) == before
    store = ProductStore(old_store)
    assert [p.id for p in store.products()] == ["old1", "old2"] and store.validate().ok
    assert _no_staging_left(old_store)


def test_failed_overwrite_from_the_cli_is_one_line_and_keeps_the_old_store(old_store, tmp_path):
    before = _snapshot(old_store)
    src = tmp_path / "new.parquet"
    _truncated_parquet(src)
    out = _run_cli("data", "import-mbe", str(src), "--out", str(old_store), "--overwrite", cwd=tmp_path)
    assert "unreadable parquet" in _error_line(out)
    assert _snapshot(old_store) == before and ProductStore(old_store).validate().ok


# --------------------------------------------- (c) an interrupted write keeps the old store
def test_exception_after_some_tables_were_written_keeps_the_old_store(old_store, monkeypatch):
    """Raise inside the writer's close, after products.parquet (several row groups) was finished."""
    from moon.data import store as store_module

    before = _snapshot(old_store)
    real_close = store_module._TableSink.close

    def close(self):
        if self.path.name == "purchases.parquet":
            raise OSError(28, "No space left on device")
        real_close(self)

    monkeypatch.setattr(store_module._TableSink, "close", close)
    with pytest.raises(OSError, match="No space left"):
        with StoreWriter(old_store, overwrite=True, flush_every=2) as w:
            for i in range(9):
                w.add_product(Product(id=f"n{i}", title=f"new {i}"))
    assert _snapshot(old_store) == before and ProductStore(old_store).validate().ok
    assert _no_staging_left(old_store)


def test_exception_while_writing_rows_keeps_the_old_store(old_store):
    before = _snapshot(old_store)
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(old_store, overwrite=True, flush_every=2) as w:
            for i in range(9):  # four row groups already on disk
                w.add_product(Product(id=f"n{i}", title=f"new {i}"))
            (getattr(w, "staging", old_store) / "images" / "x.png").write_bytes(b"new image")
            raise RuntimeError("boom")
    assert _snapshot(old_store) == before and ProductStore(old_store).validate().ok
    assert _no_staging_left(old_store) and not (old_store / "images" / "x.png").exists()


KILLED_IMPORT = textwrap.dedent(
    """
    import sys, time
    from moon.data import mbe, store
    store.StoreWriter.__init__.__kwdefaults__["flush_every"] = 4  # row groups reach the disk early
    real = mbe._import_row
    seen = [0]

    def slow(*args, **kwargs):
        seen[0] += 1
        if seen[0] == 40:  # 40 rows imported (products, queries, purchases, row groups on disk)
            print("halfway", flush=True)
            time.sleep(120)
        return real(*args, **kwargs)

    mbe._import_row = slow
    src, out = sys.argv[1], sys.argv[2]
    mbe.import_mbe([src], out, overwrite=True, query_columns=mbe.QueryColumns.parse("text=query"))
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_in_the_middle_of_an_overwrite_import_keeps_the_old_store(old_store, tmp_path):
    before = _snapshot(old_store)
    src = _jsonl(
        tmp_path / "big.jsonl", [{"id": f"n{i}", "doc_title": f"item {i}", "query": f"q {i}"} for i in range(100)]
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_IMPORT, str(src), str(old_store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "halfway" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"the import ended before it was killed: {proc.stderr.read()}")
        assert "halfway" in line
        staged = [p for p in old_store.iterdir() if p.name.startswith(STAGING_PREFIX)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(old_store) == before
    store = ProductStore(old_store)
    assert [p.id for p in store.products()] == ["old1", "old2"] and store.validate().ok
    assert staged and (staged[0] / "products.parquet").stat().st_size > 0  # the write really was under way
    # what the killed write left is only its staging folder; the next import replaces the store
    store, _ = import_mbe([str(src)], old_store, overwrite=True)
    assert len(store.products()) == 100 and store.validate().ok
    assert json.loads((old_store / "manifest.json").read_text())["counts"]["products"] == 100


# ------------------------------------------------------------------ (d) byte-order marks
def test_csv_with_a_bom_imports_every_row(tmp_path):
    """An Excel "CSV UTF-8" export: the BOM used to stick to the first column name (``\\ufeffid``)."""
    src = tmp_path / "excel.csv"
    lines = ["id,doc_title,doc_industry_name"] + [f"p{i},Item {i},Home" for i in range(3)]
    src.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))
    assert src.read_bytes().startswith(b"\xef\xbb\xbf")
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert [p.id for p in store.products()] == ["p0", "p1", "p2"]
    assert report.skipped_rows == []


def test_jsonl_with_a_bom_keeps_its_first_row(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in OLD).encode())
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert [p.id for p in store.products()] == ["old1", "old2"] and report.skipped_rows == []


def test_json_with_a_bom_is_read(tmp_path):
    src = tmp_path / "bom.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(NEW).encode())
    store, report = import_mbe([str(src)], tmp_path / "s")
    assert [p.id for p in store.products()] == ["new1"] and report.skipped_rows == []


# ------------------------------------------------ a value Python cannot hold is one bad row
def test_parquet_timestamp_out_of_pythons_range_is_a_bad_row(tmp_path):
    """Year 33,658 fits arrow's int64 milliseconds but not ``datetime``: it used to be a traceback."""
    src = tmp_path / "ts.parquet"
    table = pa.table(
        {
            "id": ["a", "b"],
            "doc_title": ["Mug", "Cup"],
            "query": ["mug", "cup"],
            "ts": pa.array([10**15, 1_700_000_000_000], pa.timestamp("ms")),
        }
    )
    pq.write_table(table, src)
    store, report = import_mbe([str(src)], tmp_path / "s", query_columns=QueryColumns.parse("text=query,timestamp=ts"))
    assert [p.id for p in store.products()] == ["b"]
    assert [p.timestamp for p in store.purchases()] == [1_700_000_000]
    assert report.skipped_rows == ["ts.parquet:1: unreadable value (date value out of range)"]
