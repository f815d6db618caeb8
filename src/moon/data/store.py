"""The product store: a directory every MOON command reads and writes.

Layout (documented in ``docs/store-format.md``)::

    STORE/
      manifest.json        format name + version, counts, creation info
      products.parquet     id, title, images, category, attributes, group
      queries.parquet      id, text, images, split
      purchases.parquet    query_id, product_id, timestamp, region
      boxes.parquet        image, x0, y0, x1, y1, source, score, crop, kind   (optional)
      images/              image files (paths in the tables are relative to STORE)

:class:`StoreWriter` streams records to disk in row groups (bounded memory for large catalogues),
into a staging folder (``STORE/.moon-tmp-…/``) that replaces the old files only once the whole
write succeeded; :class:`ProductStore` opens a store, streams records back, looks products up by id
and validates.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moon.data.records import MAX_CATEGORY_LEVELS, SPLITS, Box, Product, Purchase, Query
from moon.data.safe_open import FileRefusedError, check_regular, json_format, read_regular
from moon.errors import DataError

FORMAT_NAME = "moon-store"
FORMAT_VERSION = 1

PRODUCT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("title", pa.string()),
        ("images", pa.list_(pa.string())),
        ("category", pa.list_(pa.string())),
        ("attributes", pa.map_(pa.string(), pa.list_(pa.string()))),
        ("group", pa.string()),
    ]
)
QUERY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("images", pa.list_(pa.string())),
        ("split", pa.string()),
    ]
)
PURCHASE_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("product_id", pa.string()),
        ("timestamp", pa.int64()),
        ("region", pa.string()),
    ]
)
BOX_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("source", pa.string()),
        ("score", pa.float32()),
        ("crop", pa.string()),
        ("kind", pa.string()),
    ]
)
TABLES = {
    "products": PRODUCT_SCHEMA,
    "queries": QUERY_SCHEMA,
    "purchases": PURCHASE_SCHEMA,
    "boxes": BOX_SCHEMA,
}


class StoreError(DataError):
    """The directory is not a readable product store."""


def _rel(path: Any, root: Path | tuple[Path, ...]) -> str:
    """A path as stored: relative to the store root, with forward slashes.

    ``root`` may be several folders that stand for the store (a writer's staging folder first,
    then the store itself): an absolute path under any of them is made relative to it."""
    p = Path(path)
    if p.is_absolute():
        roots = root if isinstance(root, tuple) else (root,)
        for r in roots:
            try:
                return p.relative_to(r).as_posix()
            except ValueError:
                continue
        raise StoreError(f"{path}: image lies outside the store {roots[-1]}; copy it under images/ first") from None
    return p.as_posix()


def _product_row(p: Product, root: Path | tuple[Path, ...]) -> dict[str, Any]:
    return {
        "id": str(p.id),
        "title": p.title or "",
        "images": [_rel(x, root) for x in p.images],
        "category": [str(c) for c in p.category],
        "attributes": [(str(k), [str(v) for v in vs]) for k, vs in p.attributes.items()],
        "group": p.group,
    }


def _query_row(q: Query, root: Path | tuple[Path, ...]) -> dict[str, Any]:
    return {"id": str(q.id), "text": q.text, "images": [_rel(x, root) for x in q.images], "split": q.split}


def _purchase_row(p: Purchase, root: Path | tuple[Path, ...]) -> dict[str, Any]:
    return {
        "query_id": str(p.query_id),
        "product_id": str(p.product_id),
        "timestamp": int(p.timestamp),
        "region": p.region,
    }


def _box_row(b: Box, root: Path | tuple[Path, ...]) -> dict[str, Any]:
    return {
        "image": _rel(b.image, root),
        "x0": b.x0,
        "y0": b.y0,
        "x1": b.x1,
        "y1": b.y1,
        "source": b.source,
        "score": b.score,
        "crop": _rel(b.crop, root) if b.crop else None,
        "kind": b.kind,
    }


_ROW_OF = {"products": _product_row, "queries": _query_row, "purchases": _purchase_row, "boxes": _box_row}


class _TableSink:
    """Buffers rows of one table and writes them as parquet row groups."""

    def __init__(self, path: Path, schema: pa.Schema, flush_every: int):
        self.path = path
        self.schema = schema
        self.flush_every = flush_every
        self.rows: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self.writer.write_table(table)
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self.writer is None:  # an empty table is still a valid file with the schema
            pq.write_table(self.schema.empty_table(), self.path, compression="zstd")
        else:
            self.writer.close()


STAGING_PREFIX = ".moon-tmp-"
MANIFEST_FILE = "manifest.json"


def _table_files() -> tuple[str, ...]:
    return tuple(f"{name}.parquet" for name in TABLES)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either one missing or unreadable
        return False


def store_outputs(root: str | os.PathLike, extra_files: Iterable[str] = ()) -> list[Path]:
    """The files a store write into ``root`` creates or replaces: the tables, ``manifest.json`` and
    ``extra_files`` (names relative to ``root``, e.g. ``import-report.jsonl``)."""
    r = Path(root)
    return [r / name for name in (*_table_files(), MANIFEST_FILE, *extra_files)]


def check_sources_are_not_outputs(
    root: str | os.PathLike, sources: Iterable[str | os.PathLike], extra_files: Iterable[str] = ()
) -> None:
    """Refuse (:class:`StoreError`) when an input file is one the store write would replace.

    Compared as files (``os.path.samefile``: symlinks and hard links count), so
    ``import-mbe products.parquet --out .`` is refused before anything is written."""
    outputs = [o for o in store_outputs(root, extra_files) if o.exists()]
    for src in sources:
        for out in outputs:
            if _same_file(Path(src), out):
                raise StoreError(
                    f"{src}: this source is the {out.name} that writing the store into {root} would replace; "
                    "a source is never overwritten (move it, or write the store to another folder)"
                )


def _move_into(src: Path, dest: Path) -> None:
    """Move ``src`` (a file or a folder) to ``dest``; a folder is merged into an existing one,
    file by file (an existing file of the same name is replaced)."""
    if src.is_dir() and not src.is_symlink():
        if dest.is_dir():
            for child in sorted(src.iterdir()):
                _move_into(child, dest / child.name)
            src.rmdir()
            return
        if dest.exists() or dest.is_symlink():
            dest.unlink()
    elif _same_file(src, dest):  # hard links of one file: rename(2) would do nothing and keep src
        src.unlink()
        return
    os.replace(src, dest)


class StoreWriter:
    """Writes a store directory, streaming each table to parquet in row groups.

    Use as a context manager::

        with StoreWriter(out, created={"tool": "import-mbe"}) as w:
            w.add_product(Product(id="p1", title="...", images=[out / "images/p1.jpg"]))

    Everything is written into a hidden staging folder, ``out/.moon-tmp-<pid>-<random>/`` (same
    file system, so the final moves are renames), and moved into ``out`` only when the whole write
    succeeded: the tables, anything the caller wrote under :attr:`staging` (images, reports), and
    ``manifest.json`` last. Until then an existing store at ``out`` is untouched; an exception
    removes the staging folder (a new ``out`` is left as an empty folder, which reads as "no
    manifest.json"); a killed process leaves only the staging folder behind, which may be deleted.

    Refused with :class:`StoreError` before anything is written: a store already at ``out``
    without ``overwrite``; a folder that holds a ``manifest.json`` which is not a store's (an
    index folder) or a table file without a store manifest (``products.parquet`` of the user's
    own), without ``overwrite``; any of ``sources`` (files the caller reads while writing) that is
    one of the files the write would replace, even with ``overwrite``.

    Image paths may be absolute (inside ``out`` or inside :attr:`staging`) or relative to the store.
    ``extra_files`` names other top-level files the caller writes under :attr:`staging` (they are
    checked like the tables).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        created: dict[str, Any] | None = None,
        overwrite: bool = False,
        flush_every: int = 2048,
        sources: Iterable[str | os.PathLike] = (),
        extra_files: Iterable[str] = (),
    ):
        self.root = Path(root)
        self.overwrite = overwrite
        self.extra_files = tuple(extra_files)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: exists and is not a directory")
        check_sources_are_not_outputs(self.root, sources, self.extra_files)
        self._check_target()
        self.root.mkdir(parents=True, exist_ok=True)
        #: the folder being written; moved into :attr:`root` by :meth:`close`
        self.staging = self.root / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.staging.mkdir()
        (self.staging / "images").mkdir()
        self.created = dict(created or {})
        self._sinks = {
            name: _TableSink(self.staging / f"{name}.parquet", schema, flush_every) for name, schema in TABLES.items()
        }
        self._roots = (self.staging, self.root)
        self._write_boxes = False
        self._closed = False

    def _check_target(self) -> None:
        """Refuse to replace what is not ours to replace (see the class docstring)."""
        if not self.root.is_dir():
            return
        manifest = self.root / MANIFEST_FILE
        how = "pass --overwrite / overwrite=True to replace it"
        if manifest.exists():
            fmt = json_format(manifest, MAX_MANIFEST_BYTES)
            if fmt == FORMAT_NAME:
                if not self.overwrite:
                    raise StoreError(f"{self.root}: a store already exists here ({how})")
                return
            if not self.overwrite:
                what = "an index" if fmt == "moon-index" else f"a {fmt!r} manifest" if fmt != "?" else "unreadable"
                raise StoreError(
                    f"{self.root}: not a product store (its manifest.json is {what}); refusing to write a store "
                    f"over it ({how})"
                )
            return
        foreign = [n for n in (*_table_files(), *self.extra_files) if (self.root / n).exists()]
        if foreign and not self.overwrite:
            raise StoreError(
                f"{self.root}: holds {', '.join(foreign)} but is not a product store (no manifest.json); "
                f"refusing to replace {'it' if len(foreign) == 1 else 'them'} ({how})"
            )

    def _add(self, table: str, record: Any) -> None:
        self._sinks[table].add(_ROW_OF[table](record, self._roots))

    def add_product(self, product: Product) -> None:
        self._add("products", product)

    def add_query(self, query: Query) -> None:
        self._add("queries", query)

    def add_purchase(self, purchase: Purchase) -> None:
        self._add("purchases", purchase)

    def add_box(self, box: Box) -> None:
        self._write_boxes = True
        self._add("boxes", box)

    def add_all(self, records: Iterable[Any]) -> None:
        """Add a mixed iterable of Product/Query/Purchase/Box records."""
        adders = {Product: self.add_product, Query: self.add_query, Purchase: self.add_purchase, Box: self.add_box}
        for rec in records:
            adders[type(rec)](rec)

    def close(self) -> dict[str, Any]:
        """Flush every table, write the manifest and move the finished store into place; returns
        the manifest. Nothing at :attr:`root` changes unless every table was written."""
        if self._closed:
            return read_manifest(self.root)
        try:
            for name, sink in self._sinks.items():
                if name == "boxes" and not self._write_boxes:
                    continue
                sink.close()
            counts = {name: sink.count for name, sink in self._sinks.items() if name != "boxes" or self._write_boxes}
            manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "counts": counts, "created": self.created}
            write_manifest(self.staging, manifest)
        except BaseException:
            self.abort()
            raise
        self._commit()
        self._closed = True
        return manifest

    def _commit(self) -> None:
        """Move the complete staged store into :attr:`root` (renames only), ``manifest.json`` last.

        The old manifest goes first, so a crash inside this short window leaves a folder that reads
        as an interrupted write (no manifest), never an old manifest over new tables."""
        try:
            old = self.root / MANIFEST_FILE
            if old.exists() or old.is_symlink():
                old.unlink()
            for entry in sorted(self.staging.iterdir()):
                if entry.name != MANIFEST_FILE:
                    _move_into(entry, self.root / entry.name)
            # tables of the store being replaced must not survive it (boxes.parquet is optional)
            stale = self.root / "boxes.parquet"
            if not self._write_boxes and stale.exists():
                stale.unlink()
            os.replace(self.staging / MANIFEST_FILE, old)
            self.staging.rmdir()
        except OSError as exc:
            raise StoreError(
                f"{self.root}: could not move the written store into place ({exc}); "
                f"what was not moved is in {self.staging}"
            ) from exc

    def abort(self) -> None:
        """Drop everything written so far; the folder is left as it was before this writer."""
        for sink in self._sinks.values():
            if sink.writer is not None:
                try:
                    sink.writer.close()
                except Exception:  # noqa: BLE001 - the files are deleted next anyway
                    pass
        shutil.rmtree(self.staging, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self.abort()


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    tmp = Path(root) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, Path(root) / "manifest.json")


MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """``STORE/manifest.json``, checked: format, an integer version, ``counts`` a mapping of table
    names to integers >= 0, ``created`` a mapping. Raises :class:`StoreError` naming the field."""
    path = Path(root) / "manifest.json"
    if not Path(root).is_dir():
        raise StoreError(f"{root}: no such directory")
    if not path.exists():
        raise StoreError(f"{root}: not a product store (no manifest.json; an interrupted write leaves none)")
    try:  # never a plain open(): a FIFO named manifest.json would block, /dev/zero never end
        raw = read_regular(path, MAX_MANIFEST_BYTES, what="a manifest")
    except FileRefusedError as exc:
        if exc.reason.startswith("too large"):
            raise StoreError(f"{path}: {exc.reason}; a manifest is at most {MAX_MANIFEST_BYTES:,}") from exc
        raise StoreError(str(exc)) from exc
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StoreError(f"{path}: unreadable manifest ({exc})") from exc
    except RecursionError as exc:
        raise StoreError(f"{path}: unreadable manifest (nested too deeply)") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("version", 0)
    if not _is_count(version):
        raise StoreError(f"{path}: version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {manifest['version']} is newer than this MOON reads ({FORMAT_VERSION})"
        )
    counts = manifest.get("counts", {})
    if not isinstance(counts, dict):
        raise StoreError(f"{path}: counts must be a mapping of table names to numbers, got {counts!r}"[:300])
    for name, n in counts.items():
        if name not in TABLES:
            raise StoreError(f"{path}: counts names an unknown table {name!r} (known: {', '.join(TABLES)})"[:300])
        if not _is_count(n):
            raise StoreError(f"{path}: counts.{name} must be an integer >= 0, got {n!r}"[:300])
    if not isinstance(manifest.get("created", {}), dict):
        raise StoreError(f"{path}: created must be a mapping")
    return manifest


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column read as ``got`` can stand for the schema's ``want`` (large_* variants allowed)."""
    if got.equals(want):
        return True
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got) or pa.types.is_null(got)
    if pa.types.is_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got)) and _compatible(got.value_type, want.value_type)
    if pa.types.is_map(want):
        return (
            pa.types.is_map(got)
            and _compatible(got.key_type, want.key_type)
            and _compatible(got.item_type, want.item_type)
        )
    if pa.types.is_integer(want) or pa.types.is_floating(want):
        return pa.types.is_integer(got) or pa.types.is_floating(got) or pa.types.is_null(got)
    return False


def open_table_file(path: Path, schema: pa.Schema) -> pq.ParquetFile:
    """A parquet file of the store, checked to be readable and to have ``schema``'s columns.

    Raises :class:`StoreError` for a zero-byte, truncated or foreign file, or one that is not a
    regular file (a FIFO would block arrow's open)."""
    try:
        check_regular(path, what="a parquet table")
    except FileRefusedError as exc:
        raise StoreError(str(exc)) from exc
    if path.stat().st_size == 0:
        raise StoreError(f"{path}: empty file (0 bytes; an interrupted write?)")
    try:
        pf = pq.ParquetFile(path)
        got = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - arrow raises several types for broken files
        raise StoreError(f"{path}: unreadable parquet ({exc})") from exc
    for want in schema:
        idx = got.get_field_index(want.name)
        if idx < 0:
            raise StoreError(f"{path}: column {want.name!r} is missing")
        if not _compatible(got.field(idx).type, want.type):
            raise StoreError(f"{path}: column {want.name!r} is {got.field(idx).type}, expected {want.type}")
    return pf


def write_store(
    root: str | os.PathLike,
    products: Iterable[Product] = (),
    queries: Iterable[Query] = (),
    purchases: Iterable[Purchase] = (),
    boxes: Iterable[Box] | None = None,
    *,
    created: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ProductStore:
    """Write whole iterables of records as a store and open it."""
    with StoreWriter(root, created=created, overwrite=overwrite) as w:
        for p in products:
            w.add_product(p)
        for q in queries:
            w.add_query(q)
        for pu in purchases:
            w.add_purchase(pu)
        if boxes is not None:
            w._write_boxes = True
            for b in boxes:
                w.add_box(b)
    return ProductStore(root)


@dataclass
class ValidationIssue:
    kind: str  # e.g. "duplicate-id", "dangling-id", "missing-file", "bad-value", "count-mismatch"
    where: str  # table/row or file
    message: str


@dataclass
class ValidationReport:
    issues: list[ValidationIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def add(self, kind: str, where: str, message: str) -> None:
        self.issues.append(ValidationIssue(kind, where, message))

    def counts(self) -> dict[str, int]:
        return dict(Counter(i.kind for i in self.issues))

    def format(self, max_per_kind: int = 10) -> str:
        if self.ok:
            return "store is valid"
        lines = [f"{len(self.issues)} problem(s): " + ", ".join(f"{k}: {n}" for k, n in sorted(self.counts().items()))]
        shown: Counter[str] = Counter()
        for issue in self.issues:
            shown[issue.kind] += 1
            if shown[issue.kind] <= max_per_kind:
                lines.append(f"  [{issue.kind}] {issue.where}: {issue.message}")
            elif shown[issue.kind] == max_per_kind + 1:
                lines.append(f"  [{issue.kind}] … {self.counts()[issue.kind] - max_per_kind} more")
        return "\n".join(lines)


class ProductStore:
    """An opened product store.

    Records are streamed from parquet in batches (``iter_products``), or looked up by id after a
    one-off index of the ``id`` column (``product(id)``). Image paths in returned records are
    absolute. Call :meth:`validate` for a full consistency check.
    """

    def __init__(self, root: str | os.PathLike, *, crop_source: str | None = None):
        self.root = Path(root).resolve()
        self.manifest = read_manifest(self.root)
        for name in ("products", "queries", "purchases"):
            if not (self.root / f"{name}.parquet").exists():
                raise StoreError(f"{self.root}: {name}.parquet is missing")
        self.crop_source = crop_source
        self._product_index: dict[str, int] | None = None
        self._products_table: pa.Table | None = None
        self._crops: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"ProductStore({str(self.root)!r}, counts={self.manifest.get('counts')})"

    # ---------------------------------------------------------------- raw tables
    def path(self, rel: str) -> Path:
        """Absolute path of a store-relative path (never outside the store)."""
        try:
            p = (self.root / rel).resolve()
        except (OSError, ValueError, TypeError) as exc:  # a NUL byte, a name too long, not text
            raise StoreError(f"{str(rel)[:200]!r}: unusable path ({exc})") from None
        if self.root not in p.parents and p != self.root:
            raise StoreError(f"{rel}: path escapes the store")
        return p

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        path = self.root / f"{name}.parquet"
        if not path.exists():
            if name == "boxes":
                return BOX_SCHEMA.empty_table()
            raise StoreError(f"{path}: missing")
        open_table_file(path, TABLES[name])
        try:
            return pq.read_table(path, columns=columns)
        except Exception as exc:  # noqa: BLE001 - arrow raises several types for broken files
            raise StoreError(f"{path}: unreadable parquet ({exc})") from exc

    def _iter_rows(self, name: str, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
        """Rows of one table; :class:`StoreError` (never an arrow exception) for a broken file."""
        path = self.root / f"{name}.parquet"
        if not path.exists():
            if name == "boxes":
                return
            raise StoreError(f"{path}: missing")
        pf = open_table_file(path, TABLES[name])
        batches = pf.iter_batches(batch_size=batch_size, columns=[f.name for f in TABLES[name]])
        n = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - arrow raises several types for broken files
                raise StoreError(f"{path}: unreadable parquet after {n:,} rows ({exc})") from exc
            n += batch.num_rows
            yield from batch.to_pylist()

    # ---------------------------------------------------------------- records
    def _abs(self, rel: str) -> str:
        return str(self.root / rel)

    def _crop_map(self) -> dict[str, str]:
        if self._crops is None:
            self._crops = {}
            if self.crop_source and (self.root / "boxes.parquet").exists():
                for row in self._iter_rows("boxes"):
                    if row["source"] == self.crop_source and row.get("crop"):
                        self._crops[row["image"]] = row["crop"]
        return self._crops

    def _aligned_crops(self, images: list[str]) -> list[str | None]:
        """``crops[i]`` = absolute crop path of ``images[i]`` or None; [] when no image has one."""
        crops = self._crop_map()
        aligned = [self._abs(crops[x]) if x in crops else None for x in images]
        return aligned if any(c is not None for c in aligned) else []

    def _product(self, row: dict[str, Any]) -> Product:
        attrs = row.get("attributes") or []
        return Product(
            id=row["id"],
            title=row.get("title") or "",
            images=[self._abs(x) for x in row.get("images") or []],
            category=list(row.get("category") or []),
            attributes={k: list(v or []) for k, v in attrs},
            group=row.get("group"),
            crops=self._aligned_crops(row.get("images") or []),
        )

    def _query(self, row: dict[str, Any]) -> Query:
        images = row.get("images") or []
        return Query(
            id=row["id"],
            text=row.get("text"),
            images=[self._abs(x) for x in images],
            split=row.get("split") or "test",
            crops=self._aligned_crops(images),
        )

    def iter_products(self, batch_size: int = 1024) -> Iterator[Product]:
        for row in self._iter_rows("products", batch_size):
            yield self._product(row)

    def products(self) -> list[Product]:
        return list(self.iter_products())

    def iter_queries(self, split: str | None = None, batch_size: int = 1024) -> Iterator[Query]:
        for row in self._iter_rows("queries", batch_size):
            if split is None or row.get("split") == split:
                yield self._query(row)

    def queries(self, split: str | None = None) -> list[Query]:
        return list(self.iter_queries(split))

    def iter_purchases(self) -> Iterator[Purchase]:
        for row in self._iter_rows("purchases"):
            yield Purchase(row["query_id"], row["product_id"], int(row.get("timestamp") or 0), row.get("region") or "")

    def purchases(self) -> list[Purchase]:
        return list(self.iter_purchases())

    def iter_boxes(self, source: str | None = None) -> Iterator[Box]:
        for row in self._iter_rows("boxes"):
            if source is None or row["source"] == source:
                yield Box(
                    image=row["image"],
                    x0=float(row["x0"]),
                    y0=float(row["y0"]),
                    x1=float(row["x1"]),
                    y1=float(row["y1"]),
                    source=row["source"],
                    score=float(row["score"]) if row.get("score") is not None else 1.0,
                    crop=row.get("crop"),
                    kind=row.get("kind"),
                )

    def box_sources(self) -> list[str]:
        if not (self.root / "boxes.parquet").exists():
            return []
        return sorted(set(self.table("boxes", ["source"]).column("source").to_pylist()))

    def product_ids(self) -> list[str]:
        return self.table("products", ["id"]).column("id").to_pylist()

    def product(self, product_id: str) -> Product:
        """Look one product up by id (``KeyError`` if absent)."""
        if self._product_index is None:
            self._products_table = self.table("products")
            ids = self._products_table.column("id").to_pylist()
            self._product_index = {pid: i for i, pid in enumerate(ids)}
        i = self._product_index[str(product_id)]
        assert self._products_table is not None
        return self._product(self._products_table.slice(i, 1).to_pylist()[0])

    def positives(self, split: str | None = None) -> dict[str, set[str]]:
        """query id → ids of the products purchased after it (optionally for one split's queries)."""
        keep = None
        if split is not None:
            qt = self.table("queries", ["id", "split"])
            keep = {
                q
                for q, s in zip(qt.column("id").to_pylist(), qt.column("split").to_pylist(), strict=False)
                if s == split
            }
        out: dict[str, set[str]] = {}
        pt = self.table("purchases", ["query_id", "product_id"])
        for q, p in zip(pt.column("query_id").to_pylist(), pt.column("product_id").to_pylist(), strict=False):
            if keep is None or q in keep:
                out.setdefault(q, set()).add(p)
        return out

    # ---------------------------------------------------------------- checks
    def validate(self, *, check_files: bool = True, check_images: bool = False) -> ValidationReport:
        """Check the store: duplicate ids, dangling ids, missing files, bad values, manifest counts.

        ``check_images`` additionally decodes every image with the safe loader (slow).
        """
        from moon.data.images import ImageLoadError, load_image

        report = ValidationReport()
        seen_files: set[str] = set()

        def check_file(rel: str, where: str) -> None:
            if not check_files or rel in seen_files:
                return
            seen_files.add(rel)
            try:
                p = self.path(rel)
            except StoreError as exc:
                report.add("bad-path", where, str(exc))
                return
            if not p.is_file():
                report.add("missing-file", where, f"{rel} does not exist")
            elif check_images:
                try:
                    load_image(p)
                except ImageLoadError as exc:
                    report.add("bad-image", where, exc.reason)

        unreadable: set[str] = set()

        def rows(name: str) -> Iterator[tuple[int, dict[str, Any]]]:
            try:
                yield from enumerate(self._iter_rows(name))
            except StoreError as exc:
                unreadable.add(name)
                report.add("unreadable-file", f"{name}.parquet", str(exc))

        product_ids: set[str] = set()
        n_products = 0
        for i, row in rows("products"):
            n_products += 1
            where = f"products.parquet row {i}"
            pid = row.get("id")
            if not pid:
                report.add("bad-value", where, "empty product id")
                continue
            if pid in product_ids:
                report.add("duplicate-id", where, f"product id {pid!r} appears more than once")
            product_ids.add(pid)
            if len(row.get("category") or []) > MAX_CATEGORY_LEVELS:
                report.add(
                    "bad-value", where, f"category has {len(row['category'])} levels (at most {MAX_CATEGORY_LEVELS})"
                )
            for img in row.get("images") or []:
                check_file(img, where)
        query_ids: set[str] = set()
        n_queries = 0
        for i, row in rows("queries"):
            n_queries += 1
            where = f"queries.parquet row {i}"
            qid = row.get("id")
            if not qid:
                report.add("bad-value", where, "empty query id")
                continue
            if qid in query_ids:
                report.add("duplicate-id", where, f"query id {qid!r} appears more than once")
            query_ids.add(qid)
            if row.get("split") not in SPLITS:
                report.add("bad-value", where, f"split {row.get('split')!r} is not one of {', '.join(SPLITS)}")
            if not (row.get("text") or "").strip() and not row.get("images"):
                report.add("bad-value", where, f"query {qid!r} has neither text nor images")
            for img in row.get("images") or []:
                check_file(img, where)
        n_purchases = 0
        for i, row in rows("purchases"):
            n_purchases += 1
            where = f"purchases.parquet row {i}"
            # ids of a table that could not be read are unknown, not dangling
            if "queries" not in unreadable and row.get("query_id") not in query_ids:
                report.add("dangling-id", where, f"query id {row.get('query_id')!r} is not in queries.parquet")
            if "products" not in unreadable and row.get("product_id") not in product_ids:
                report.add("dangling-id", where, f"product id {row.get('product_id')!r} is not in products.parquet")
        n_boxes = 0
        for i, row in rows("boxes"):
            n_boxes += 1
            where = f"boxes.parquet row {i}"
            coords = (row.get("x0"), row.get("y0"), row.get("x1"), row.get("y1"))
            if any(c is None or c != c for c in coords):  # null or NaN
                report.add("bad-value", where, f"box has a missing coordinate {coords}")
            else:
                if not (coords[0] < coords[2] and coords[1] < coords[3]):
                    report.add("bad-value", where, f"empty or inverted box {coords}")
                if min(coords[0], coords[1]) < 0:
                    report.add("bad-value", where, "box has negative coordinates")
            if not row.get("image"):
                report.add("bad-value", where, "box names no image")
                continue
            check_file(row["image"], where)
            if row.get("crop"):
                check_file(row["crop"], where)
        counts = self.manifest.get("counts", {})
        actual = {"products": n_products, "queries": n_queries, "purchases": n_purchases}
        if (self.root / "boxes.parquet").exists():
            actual["boxes"] = n_boxes
        for name, n in actual.items():
            if name in counts and name not in unreadable and counts[name] != n:
                report.add("count-mismatch", "manifest.json", f"says {counts[name]} {name}, the table has {n}")
        return report

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Summary numbers for ``moon data stats`` (all computed by streaming)."""
        depth: Counter[int] = Counter()
        attr_types: Counter[str] = Counter()
        attr_values: dict[str, set[str]] = {}
        images_per: Counter[int] = Counter()
        groups: Counter[str] = Counter()
        leaves: set[tuple[str, ...]] = set()
        n_products = 0
        for row in self._iter_rows("products"):
            n_products += 1
            cat = row.get("category") or []
            depth[len(cat)] += 1
            if cat:
                leaves.add(tuple(cat))
            for k, vs in row.get("attributes") or []:
                attr_types[k] += 1
                attr_values.setdefault(k, set()).update(vs or [])
            images_per[len(row.get("images") or [])] += 1
            if row.get("group"):
                groups[row["group"]] += 1
        modality: dict[str, Counter[str]] = {}
        query_split: dict[str, str] = {}
        for row in self._iter_rows("queries"):
            q = Query(id=row["id"], text=row.get("text"), images=row.get("images") or [], split=row.get("split"))
            modality.setdefault(q.split, Counter())[q.modality] += 1
            query_split[q.id] = q.split
        purchases_split: Counter[str] = Counter()
        n_purchases = 0
        for row in self._iter_rows("purchases"):
            n_purchases += 1
            purchases_split[query_split.get(row["query_id"], "?")] += 1
        total_images = sum(k * v for k, v in images_per.items())
        dup_groups = {g: n for g, n in groups.items() if n > 1}
        box_sources = (
            Counter(self.table("boxes", ["source"]).column("source").to_pylist())
            if (self.root / "boxes.parquet").exists()
            else Counter()
        )
        all_modality: Counter[str] = Counter()
        for c in modality.values():
            all_modality.update(c)
        return {
            "products": n_products,
            "queries": sum(all_modality.values()),
            "purchases": n_purchases,
            "category_levels": max(depth) if depth else 0,
            "category_depth_histogram": {str(k): v for k, v in sorted(depth.items())},
            "leaf_categories": len(leaves),
            "attribute_types": {
                k: {"products": attr_types[k], "values": len(attr_values[k])} for k in sorted(attr_types)
            },
            "images_per_product": {
                "mean": total_images / n_products if n_products else 0.0,
                "min": min(images_per) if images_per else 0,
                "max": max(images_per) if images_per else 0,
                "histogram": {str(k): v for k, v in sorted(images_per.items())},
            },
            "query_modality": dict(all_modality),
            "query_modality_by_split": {s: dict(c) for s, c in sorted(modality.items())},
            "purchases_by_split": dict(sorted(purchases_split.items())),
            "duplicate_listings": {"groups": len(dup_groups), "products": sum(dup_groups.values())},
            "boxes_by_source": dict(box_sources),
        }


def copy_image_into(root: Path, src: Path, rel: str) -> str:
    """Copy (or hard-link when possible) an image file into the store; returns its relative path."""
    dest = Path(root) / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    return Path(rel).as_posix()


def replace_boxes(root: str | os.PathLike, source: str, boxes: Iterable[Box]) -> int:
    """Replace every box of ``source`` in ``boxes.parquet`` (keeping other sources); returns the count.

    The table is rewritten to a temp file and renamed over the old one, and the manifest's box
    count is updated, so a crash never leaves a half-written table.
    """
    store_root = Path(root)
    manifest = read_manifest(store_root)
    path = store_root / "boxes.parquet"
    kept = pq.read_table(path) if path.exists() else BOX_SCHEMA.empty_table()
    if kept.num_rows:
        import pyarrow.compute as pc

        kept = kept.filter(pc.not_equal(kept.column("source"), source))
    rows = []
    for b in boxes:
        if b.source != source:
            raise ValueError(f"box source {b.source!r} differs from {source!r}")
        rows.append(_box_row(b, store_root))
    new = pa.Table.from_pylist(rows, schema=BOX_SCHEMA)
    table = pa.concat_tables([kept.cast(BOX_SCHEMA), new])
    tmp = store_root / "boxes.parquet.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    manifest.setdefault("counts", {})["boxes"] = table.num_rows
    write_manifest(store_root, manifest)
    return len(rows)
