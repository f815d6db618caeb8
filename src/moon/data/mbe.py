"""Import the released MBE files (Daoze/MM-Bench-E-Commerce) into a product store.

Product columns (documented by the authors): ``id``, ``doc_title``, ``doc_image``,
``doc_industry_name``, ``doc_cate1_name`` … ``doc_cate4_name``, ``doc_attributes``. The query side
is undocumented, so it comes from a :class:`QueryColumns` mapping. Bad rows are skipped and
reported with their file and row number; good rows are kept; unreadable images are reported and
left out of the product (the product itself is kept).

Hostile input is a bad row, never a crash: a byte that is not UTF-8 (in that row only), JSON nested
too deeply, a CSV field over :data:`MAX_CSV_FIELD` bytes, a list or binary value where text
belongs. Over-long text is cut to :data:`LIMITS` (and reported); an image path that resolves
outside ``--images`` and the source file's folder is not copied unless ``allow_outside_images``.
Every problem is listed in ``STORE/import-report.jsonl``.
"""

from __future__ import annotations

import codecs
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moon.data.images import ImageLoadError, load_image, read_image_bytes
from moon.data.records import SPLITS, Product, Purchase, Query
from moon.data.safe_open import FileRefusedError, check_regular, open_regular
from moon.data.store import ProductStore, StoreWriter
from moon.errors import ConfigError, DataError

CATEGORY_COLUMNS = ("doc_industry_name", "doc_cate1_name", "doc_cate2_name", "doc_cate3_name", "doc_cate4_name")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
DEFAULT_CACHE = Path(os.environ.get("MOON_CACHE", Path.home() / ".cache" / "moon")) / "mbe-images"
REPORT_FILE = "import-report.jsonl"

#: longest text kept per field (characters); longer values are cut and reported. MBE titles are
#: ~60 characters; a 50 MB title would otherwise cost gigabytes when the index is built.
LIMITS = {"id": 256, "title": 2_000, "category": 200, "attribute": 500, "query": 2_000, "image": 4_096}
MAX_ATTRIBUTE_PAIRS = 256
MAX_IMAGES_PER_ROW = 64
#: longest line read from a .jsonl (bytes) or .csv (characters) file; a longer one is a bad row
#: (read and dropped in pieces, never held whole). Large enough for a 50 MB title, which is then cut.
MAX_LINE = 64 * 1024 * 1024
#: largest CSV field read (characters; Python's default is 131,072); a larger one makes its row bad
MAX_CSV_FIELD = MAX_LINE


class RowError(ValueError):
    """One row cannot be imported (the message is the reason)."""


def _preview(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a byte that was not UTF-8, a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for an undecodable byte
            return f"byte 0x{code - 0xDC00:02x} at character {exc.start} is not UTF-8"
        return f"a lone surrogate (U+{code:04X}) at character {exc.start}"
    return None


def text_value(value: Any, column: str) -> str:
    """A cell as clean text: ``""`` for missing/NaN/"null"; raises :class:`RowError` for a list,
    mapping, binary that is not UTF-8, or text that is not valid Unicode."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(f"{column} is binary, not UTF-8 text (byte 0x{value[exc.start]:02x})") from None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"{column} is a {type(value).__name__} ({_preview(value)}), expected text")
    if isinstance(value, float) and value != value:  # NaN from pandas-made files
        return ""
    text = str(value)
    problem = _unicode_problem(text)
    if problem:
        raise RowError(f"{column}: {problem}")
    text = text.strip()
    return "" if text.lower() in ("nan", "none", "null") else text


@dataclass
class QueryColumns:
    """Which source columns hold the query side of a row.

    Parsed from ``"text=query,image=query_img|query_img2,product=id,id=qid,timestamp=ts,region=r"``.
    ``product`` defaults to ``id`` (the purchased product is the row's product).
    """

    text: str | None = None
    images: list[str] = field(default_factory=list)
    product: str = "id"
    id: str | None = None
    timestamp: str | None = None
    region: str | None = None
    split: str | None = None

    @classmethod
    def parse(cls, spec: str | None) -> QueryColumns | None:
        if not spec:
            return None
        out = cls()
        known = {"text", "image", "images", "product", "id", "timestamp", "region", "split"}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value or key not in known:
                raise ConfigError(
                    f"--query-columns: cannot read {part!r}; expected KEY=COLUMN with KEY one of "
                    "text, image, product, id, timestamp, region, split (e.g. 'text=query,image=query_image')"
                )
            if key in ("image", "images"):
                out.images = [c.strip() for c in value.split("|") if c.strip()]
            else:
                setattr(out, key, value)
        if not out.text and not out.images:
            raise ConfigError("--query-columns needs a text column and/or an image column")
        return out


def parse_attributes(raw: Any) -> dict[str, list[str]]:
    """Parse MBE's ``key:value,,key:value!!!value2`` attribute string.

    Spaces around parts are stripped, empty parts skipped, a value may itself contain ``:`` (only
    the first ``:`` separates key and value), repeated keys merge their values in order.
    A dict (already parsed) is accepted when its keys and values are text. Raises ``ValueError``
    for a part with no ``:``, an empty key, or more than :data:`MAX_ATTRIBUTE_PAIRS` values (the
    string is never split further than that, so a huge one costs no more than a small one);
    :class:`RowError` (a ``ValueError``) for a list, mapping or non-UTF-8 value where text belongs.
    """
    if raw is None:
        return {}
    too_many = f"more than {MAX_ATTRIBUTE_PAIRS} attribute values"
    if isinstance(raw, dict):
        if len(raw) > MAX_ATTRIBUTE_PAIRS:
            raise ValueError(too_many)
        out_map: dict[str, list[str]] = {}
        n = 0
        for k, vs in raw.items():
            key = text_value(k, "attribute key")
            items = vs if isinstance(vs, (list, tuple)) else [vs]
            n += len(items)
            if n > MAX_ATTRIBUTE_PAIRS:
                raise ValueError(too_many)
            values = [t for t in (text_value(v, f"attribute {_preview(key, 40)}") for v in items) if t]
            if key and values:
                out_map[key] = values
        return out_map
    text = text_value(raw, "doc_attributes")
    if not text or text.lower() in ("nan", "none", "null"):
        return {}
    out: dict[str, list[str]] = {}
    parts = text.split(",,", MAX_ATTRIBUTE_PAIRS)
    if len(parts) > MAX_ATTRIBUTE_PAIRS:
        raise ValueError(too_many)
    for part in parts:
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"attribute part {_preview(part)} is not key:value")
        pieces = value.split("!!!", MAX_ATTRIBUTE_PAIRS)
        if len(pieces) > MAX_ATTRIBUTE_PAIRS:
            raise ValueError(too_many)
        values = [v.strip() for v in pieces if v.strip()]
        bucket = out.setdefault(key, [])
        for v in values:
            if v not in bucket:
                bucket.append(v)
        if sum(len(b) for b in out.values()) > MAX_ATTRIBUTE_PAIRS:
            raise ValueError(too_many)
    return {k: v for k, v in out.items() if v}


def _clean(value: Any, column: str = "value") -> str:
    return text_value(value, column)


def _json_row(text: str) -> dict[str, Any]:
    try:
        row = json.loads(text)
    except RecursionError:
        return {"__error__": "JSON nested too deeply"}
    except json.JSONDecodeError as exc:
        return {"__error__": f"invalid JSON ({exc.msg})"}
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        return {"__error__": f"invalid JSON ({str(exc)[:200]})"}
    return row if isinstance(row, dict) else {"__error__": "not a JSON object"}


class _LineTooLong(Exception):
    """A line over :data:`MAX_LINE` (already read past and dropped)."""


class _BoundedLines:
    """Lines of ``fh`` (text or binary) of at most :data:`MAX_LINE`: a longer one is read and
    dropped in 1 MiB pieces (never held whole) and raises :class:`_LineTooLong` in its place;
    iteration goes on with the next line."""

    def __init__(self, fh: Any, binary: bool):
        self.fh = fh
        self.newline: Any = b"\n" if binary else ("\n", "\r")
        self.unit = "bytes" if binary else "characters"

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> Any:
        line = self.fh.readline(MAX_LINE + 1)
        if not line:
            raise StopIteration
        if len(line) > MAX_LINE and not line.endswith(self.newline):
            while True:
                rest = self.fh.readline(1 << 20)
                if not rest or rest.endswith(self.newline):
                    break
            raise _LineTooLong(f"line longer than {MAX_LINE:,} {self.unit}")
        return line


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open_regular(path, what="a data file") as fh:
        lines = _BoundedLines(fh, binary=True)
        i = 0
        while True:
            i += 1
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _LineTooLong as exc:
                yield i, {"__error__": str(exc)}
                continue
            if i == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not part of the first row
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield i, {"__error__": f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start} of the line)"}
                continue
            yield i, _json_row(line)


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV file; a field over :data:`MAX_CSV_FIELD` characters, a line over
    :data:`MAX_LINE` or a malformed line is a bad row (the reader goes on with the next one);
    undecodable bytes reach :func:`text_value` as surrogates (``surrogateescape``) and make only
    their own row bad. Row numbers count records after the header (1 = first data row)."""
    previous = csv.field_size_limit(MAX_CSV_FIELD)
    try:
        # utf-8-sig: an Excel export starts with a byte-order mark, which must not become part of
        # the first column's name ("\ufeffid" would make every row "no id")
        raw = open_regular(path, what="a data file")
        with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(_BoundedLines(fh, binary=False), delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                return
            except (csv.Error, _LineTooLong) as exc:
                raise DataError(f"{path}: unreadable CSV header ({exc})") from exc
            columns = [text_value(c, "column name") if _unicode_problem(c) is None else c for c in header]
            i = 0
            while True:
                i += 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except _LineTooLong as exc:
                    yield i, {"__error__": str(exc)}
                    continue
                except csv.Error as exc:
                    limit = f"{MAX_CSV_FIELD:,}"
                    reason = str(exc).replace(f"({MAX_CSV_FIELD})", f"({limit} characters)")
                    yield i, {"__error__": f"unreadable CSV row ({reason})"}
                    continue
                yield i, dict(zip(columns, cells, strict=False))
    finally:
        csv.field_size_limit(previous)


def _batch_rows(batch: Any) -> list[dict[str, Any]]:
    """A parquet batch as row dicts; a row whose value Python cannot hold (a timestamp in the year
    3,000,000) becomes ``{"__error__": reason}`` instead of failing the whole batch."""
    try:
        return batch.to_pylist()
    except Exception:  # noqa: BLE001 - OverflowError, ValueError, arrow errors: find the bad rows
        rows = []
        for j in range(batch.num_rows):
            try:
                rows.append(batch.slice(j, 1).to_pylist()[0])
            except Exception as exc:  # noqa: BLE001
                rows.append({"__error__": f"unreadable value ({str(exc)[:200]})"})
        return rows


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, row_dict)`` from a json / jsonl / parquet / csv file (row numbers from 1).

    A row that cannot be read at all is ``{"__error__": reason}``; a file that cannot be read from
    some row on ends with ``{"__error__": reason, "__stop__": True}``.
    """
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    try:  # a FIFO, device, socket or directory is refused here, before anything opens it
        check_regular(path, what="a data file")
    except FileRefusedError as exc:
        raise DataError(f"{path}: no such file" if exc.reason == "file not found" else str(exc)) from exc
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        with open_regular(path, what="a data file") as fh:
            text = fh.read().decode("utf-8-sig", errors="surrogateescape")  # a leading BOM is dropped
        try:
            data = json.loads(text)
        except RecursionError as exc:
            raise DataError(f"{path}: JSON nested too deeply") from exc
        except ValueError as exc:  # JSONDecodeError, or an integer of more than 4,300 digits
            raise DataError(f"{path}: invalid JSON ({str(exc)[:200]})") from exc
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            keys = list(data)  # column-oriented {"id": [...], "doc_title": [...]}
            n = max(len(v) for v in data.values())
            data = [{k: (data[k][i] if i < len(data[k]) else None) for k in keys} for i in range(n)]
        elif isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for i, row in enumerate(data, 1):
            yield i, row if isinstance(row, dict) else {"__error__": "not a JSON object"}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - arrow raises several types for broken files
            raise DataError(f"{path}: unreadable parquet ({exc})") from exc
        i = 0
        batches = pf.iter_batches(batch_size=2048)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a damaged row group: keep what came before
                yield i + 1, {"__error__": f"unreadable from here on ({exc})", "__stop__": True}
                return
            for row in _batch_rows(batch):
                i += 1
                yield i, row
    elif suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .parquet or .csv)")


@dataclass
class ImportReport:
    """What ``import_mbe`` kept and what it skipped (with file:row and reason)."""

    products: int = 0
    queries: int = 0
    purchases: int = 0
    images: int = 0
    skipped_rows: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    report_file: str | None = None

    def problems(self) -> Iterator[dict[str, str]]:
        """Every problem as ``{"kind", "message"}`` (what ``import-report.jsonl`` holds)."""
        for kind, items in (
            ("skipped-row", self.skipped_rows),
            ("missing-image", self.missing_images),
            ("truncated", self.truncated),
        ):
            for message in items:
                yield {"kind": kind, "message": message}

    def format(self, max_lines: int = 20) -> str:
        lines = [
            f"imported {self.products} products, {self.queries} queries, {self.purchases} purchases, {self.images} images",
        ]
        for title, items in (
            ("skipped rows", self.skipped_rows),
            ("images not available", self.missing_images),
            ("warning: text cut to its length limit", self.truncated),
        ):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {x}" for x in items[:max_lines]]
                if len(items) > max_lines:
                    lines.append(f"  … {len(items) - max_lines} more")
        if self.report_file and (self.skipped_rows or self.missing_images or self.truncated):
            lines.append(f"every problem is listed in {self.report_file}")
        return "\n".join(lines)


class ImageResolver:
    """Finds the local file for an MBE ``doc_image`` value and copies it into the store.

    Order: a local path or ``file://`` URL; a file of the same name in ``images_dir``; the download
    cache; a download (only when ``download`` is set). Every image is decoded once with the safe
    loader before it is accepted. A local file is used only when it resolves (symlinks followed)
    inside ``images_dir`` or ``base_dir`` (the source file's folder), unless ``allow_outside``:
    a data file must not be able to copy ``../../home/me/secret.png`` into a store that is served.
    """

    def __init__(
        self,
        root: Path,
        images_dir: Path | None,
        cache_dir: Path,
        download: bool,
        base_dir: Path,
        *,
        allow_outside: bool = False,
    ):
        self.root = root
        self.images_dir = images_dir
        self.cache_dir = cache_dir
        self.download = download
        self.base_dir = base_dir
        self.allow_outside = allow_outside
        self.roots = [d.resolve() for d in (images_dir, base_dir) if d is not None]
        self.done: dict[str, str | None] = {}

    def _outside(self, path: Path) -> bool:
        real = path.resolve()
        return not any(real == r or r in real.parents for r in self.roots)

    def _candidate(self, ref: str) -> tuple[Path | None, str]:
        parsed = urllib.parse.urlparse(ref)
        if parsed.scheme == "file":
            return Path(urllib.parse.unquote(parsed.path)), ""
        if parsed.scheme in ("http", "https"):
            name = Path(urllib.parse.unquote(parsed.path)).name
            if self.images_dir is not None and name and (self.images_dir / name).is_file():
                return self.images_dir / name, ""
            cached = self.cache_dir / self._cache_name(ref)
            if cached.is_file():
                return cached, ""
            if not self.download:
                return None, "not found locally (pass --images DIR with the files, or --download)"
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                req = urllib.request.Request(ref, headers={"User-Agent": "moon-import/0.1"})
                with urllib.request.urlopen(req, timeout=20) as resp:  # noqa: S310 - http(s) only, checked above
                    data = resp.read(50_000_000)
                tmp = cached.with_suffix(".part")
                tmp.write_bytes(data)
                os.replace(tmp, cached)
                return cached, ""
            except Exception as exc:  # noqa: BLE001 - network errors of every kind are reported
                return None, f"download failed ({exc})"
        path = Path(ref)
        if not path.is_absolute():
            found = [
                c
                for base in ([self.images_dir] if self.images_dir else []) + [self.base_dir]
                for c in (base / path, base / path.name)
                if c.exists()  # a FIFO or directory of that name is found, then refused by its kind
            ]
            found.sort(key=lambda c: not c.is_file())  # but a regular file comes first
            # a file inside the allowed folders wins over "../x.jpg" resolving outside them
            inside = [c for c in found if not self._outside(c)]
            if inside or found:
                return (inside or found)[0], ""
        return path, ""

    @staticmethod
    def _cache_name(ref: str) -> str:
        suffix = Path(urllib.parse.urlparse(ref).path).suffix.lower()
        return hashlib.sha1(ref.encode()).hexdigest() + (suffix if suffix in IMAGE_SUFFIXES else ".img")

    def resolve(self, ref: str) -> tuple[str | None, str]:
        """Return (store-relative path or None, reason when None)."""
        if ref in self.done:
            return self.done[ref], "unavailable (see earlier report)"
        rel, reason = self._resolve(ref)
        self.done[ref] = rel
        return rel, reason

    def _resolve(self, ref: str) -> tuple[str | None, str]:
        try:
            path, reason = self._candidate(ref)
            if path is None or not path.exists():  # a FIFO, device or directory is refused below
                return None, reason or "file not found"
            from_cache = path.resolve().parent == self.cache_dir.resolve()
            outside = not from_cache and not self.allow_outside and self._outside(path)
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system, …
            return None, f"unusable path ({str(exc)[:120]})"
        if outside:
            where = " or ".join(str(r) for r in self.roots)
            return None, f"lies outside {where}; not copied (pass --allow-outside-images to import it)"
        try:  # read once, the safe way (regular files only, size-capped), then decode those bytes
            data = read_image_bytes(path)
            img = load_image(data, name=str(path))
        except ImageLoadError as exc:
            return None, exc.reason
        digest = hashlib.sha1(data).hexdigest()[:16]
        fmt = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") else ".png"
        rel = f"images/mbe/{digest}{fmt}"
        dest = self.root / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            if fmt == ".png" and path.suffix.lower() not in (".png",):
                img.save(dest, format="PNG")
            else:
                dest.write_bytes(data)
        return rel, ""


def _split_images(raw: Any, column: str = "doc_image") -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [t for t in (text_value(x, f"{column} entry") for x in raw) if t]
    text = text_value(raw, column)
    if not text:
        return []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError):
            items = None
        if isinstance(items, list):
            return [t for t in (text_value(x, f"{column} entry") for x in items) if t]
    for sep in ("!!!", ",,", "|", ";"):
        if sep in text:  # split no further than the caller keeps (plus one part to tell it more came)
            return [x.strip() for x in text.split(sep, MAX_IMAGES_PER_ROW) if x.strip()]
    return [text]


def parse_sources(sources: list[str], default_split: str) -> list[tuple[Path, str]]:
    """``["train=a.parquet", "b.jsonl"]`` → ``[(a.parquet, "train"), (b.jsonl, default_split)]``."""
    out = []
    for src in sources:
        split, sep, path = src.partition("=")
        if sep and split in SPLITS:
            out.append((Path(path), split))
        else:
            out.append((Path(src), default_split))
    return out


def import_mbe(
    sources: list[str],
    out: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    query_columns: QueryColumns | None = None,
    split: str = "test",
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_outside_images: bool = False,
) -> tuple[ProductStore, ImportReport]:
    """Turn MBE-format files into a product store; returns the opened store and the report.

    ``sources`` are file paths, each optionally prefixed ``train=``/``val=``/``test=`` to set the
    split of the queries it yields (else ``split``). Every problem (skipped row, unavailable image,
    text cut to :data:`LIMITS`) is written to ``STORE/import-report.jsonl``.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    root = Path(out)
    files = parse_sources(sources, split)
    for path, _ in files:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    report = ImportReport()
    created = {"tool": "moon data import-mbe", "sources": [str(p) for p, _ in files]}
    # everything goes to the writer's staging folder and replaces what is at ``out`` only once every
    # source was read; a source that is one of the files the store would replace is refused
    with StoreWriter(
        root, created=created, overwrite=overwrite, sources=[p for p, _ in files], extra_files=(REPORT_FILE,)
    ) as writer:
        resolver = ImageResolver(
            writer.staging,
            Path(images_dir) if images_dir else None,
            Path(cache_dir) if cache_dir else DEFAULT_CACHE,
            download,
            files[0][0].parent if files else Path("."),
            allow_outside=allow_outside_images,
        )
        products: dict[str, tuple[str, tuple[str, ...]]] = {}  # id → (title, category) for dup checks
        query_keys: dict[tuple[str, str, tuple[str, ...]], str] = {}
        written_queries: set[str] = set()
        n_query = 0
        iterator = ((p, s, i, row) for p, s in files for i, row in read_rows(p))
        if progress:
            from moon import progress as progress_display

            iterator = progress_display.track(iterator, "import-mbe", unit="row")
        for path, file_split, i, row in iterator:
            where = f"{path.name}:{i}"
            if "__error__" in row:
                report.skipped_rows.append(f"{where}: {row['__error__']}")
                continue
            try:
                n_query = _import_row(
                    row, where, file_split, query_columns, writer, resolver, report, products, query_keys,
                    written_queries, n_query,
                )  # fmt: skip
            except RowError as exc:
                report.skipped_rows.append(f"{where}: {exc}")
        report.report_file = str(root / REPORT_FILE)
        with open(writer.staging / REPORT_FILE, "w", encoding="utf-8") as fh:
            for problem in report.problems():
                fh.write(json.dumps(problem, ensure_ascii=False) + "\n")
        writer.created["report"] = {
            "skipped_rows": len(report.skipped_rows),
            "missing_images": len(report.missing_images),
            "truncated": len(report.truncated),
            "file": REPORT_FILE,
        }
    return ProductStore(root), report


def _capped(text: str, limit: str, column: str, where: str, report: ImportReport) -> str:
    n = LIMITS[limit]
    if len(text) <= n:
        return text
    report.truncated.append(f"{where}: {column} cut from {len(text):,} to {n:,} characters")
    return text[:n]


def _timestamp(value: Any) -> int:
    if isinstance(value, _dt.datetime):
        return int(value.timestamp())
    try:
        raw = text_value(value, "timestamp")
        return int(float(raw)) if raw else 0
    except (RowError, ValueError, OverflowError):
        return 0


def _import_row(
    row: dict[str, Any],
    where: str,
    file_split: str,
    query_columns: QueryColumns | None,
    writer: StoreWriter,
    resolver: ImageResolver,
    report: ImportReport,
    products: dict[str, tuple[str, tuple[str, ...]]],
    query_keys: dict[tuple[str, str, tuple[str, ...]], str],
    written_queries: set[str],
    n_query: int,
) -> int:
    """Import one source row (a product and, with ``query_columns``, a query + purchase).

    Returns the new query counter; raises :class:`RowError` for a row that cannot be imported.
    """
    pid = text_value(row.get("id"), "id")
    if not pid:
        raise RowError("no id")
    if len(pid) > LIMITS["id"]:
        raise RowError(f"id is {len(pid):,} characters long (at most {LIMITS['id']})")
    title = _capped(text_value(row.get("doc_title"), "doc_title"), "title", "doc_title", where, report)
    category = tuple(
        _capped(c, "category", col, where, report)
        for col in CATEGORY_COLUMNS
        for c in [text_value(row.get(col), col)]
        if c
    )
    if pid in products:
        if products[pid] != (title, category):
            raise RowError(f"duplicate id {pid!r} with different content (first row kept)")
    else:
        if not title:
            raise RowError(f"product {pid!r} has no title")
        try:
            attributes = parse_attributes(row.get("doc_attributes"))
        except RowError:
            raise
        except ValueError as exc:
            raise RowError(f"unreadable attributes ({exc})") from None
        if sum(len(v) for v in attributes.values()) > MAX_ATTRIBUTE_PAIRS:
            raise RowError(f"more than {MAX_ATTRIBUTE_PAIRS} attribute values")
        attributes = {
            _capped(k, "attribute", "attribute key", where, report): [
                _capped(v, "attribute", f"attribute {k[:40]!r}", where, report) for v in vs
            ]
            for k, vs in attributes.items()
        }
        images = []
        for ref in _image_refs(row.get("doc_image"), "doc_image", where, report):
            rel, reason = resolver.resolve(ref)
            if rel is None:
                report.missing_images.append(f"{where}: {_preview(ref, 200)}: {reason}")
            else:
                images.append(rel)
        writer.add_product(Product(id=pid, title=title, images=images, category=list(category), attributes=attributes))
        products[pid] = (title, category)
        report.products += 1
        report.images += len(images)
    if query_columns is None:
        return n_query
    text = text_value(row.get(query_columns.text), query_columns.text) if query_columns.text else ""
    text = _capped(text, "query", query_columns.text or "query", where, report)
    qimages = []
    for col in query_columns.images:
        for ref in _image_refs(row.get(col), col, where, report):
            rel, reason = resolver.resolve(ref)
            if rel is None:
                report.missing_images.append(f"{where}: query image {_preview(ref, 200)}: {reason}")
            else:
                qimages.append(rel)
    if not text and not qimages:
        raise RowError("query has neither text nor a usable image")
    target = text_value(row.get(query_columns.product), query_columns.product) or pid
    if target not in products:
        raise RowError(f"purchased product {_preview(target)} is not (yet) in the data")
    qsplit = text_value(row.get(query_columns.split), query_columns.split) if query_columns.split else file_split
    if qsplit not in SPLITS:
        raise RowError(f"split {_preview(qsplit)} is not one of {', '.join(SPLITS)}")
    qid = text_value(row.get(query_columns.id), query_columns.id) if query_columns.id else ""
    if len(qid) > LIMITS["id"]:
        raise RowError(f"query id is {len(qid):,} characters long (at most {LIMITS['id']})")
    key = (qsplit, text, tuple(qimages))
    if not qid:
        qid = query_keys.get(key) or f"q{n_query:08d}"
    if qid not in written_queries:
        writer.add_query(Query(id=qid, text=text or None, images=qimages, split=qsplit))
        written_queries.add(qid)
        query_keys[key] = qid
        n_query += 1
        report.queries += 1
    ts = _timestamp(row.get(query_columns.timestamp)) if query_columns.timestamp else 0
    region = text_value(row.get(query_columns.region), query_columns.region) if query_columns.region else ""
    writer.add_purchase(Purchase(query_id=qid, product_id=target, timestamp=ts, region=region[: LIMITS["category"]]))
    report.purchases += 1
    return n_query


def _image_refs(raw: Any, column: str, where: str, report: ImportReport) -> list[str]:
    """Image references of a cell: at most :data:`MAX_IMAGES_PER_ROW`, each of bounded length."""
    refs = _split_images(raw, column)
    if len(refs) > MAX_IMAGES_PER_ROW:
        report.truncated.append(
            f"{where}: {column} lists more than {MAX_IMAGES_PER_ROW} images; the first {MAX_IMAGES_PER_ROW} kept"
        )
        refs = refs[:MAX_IMAGES_PER_ROW]
    keep = []
    for ref in refs:
        if len(ref) > LIMITS["image"]:
            report.missing_images.append(f"{where}: {_preview(ref)}: longer than {LIMITS['image']:,} characters")
        else:
            keep.append(ref)
    return keep
