"""Import the released MBE files (Daoze/MM-Bench-E-Commerce) into a product store.

Product columns (documented by the authors): ``id``, ``doc_title``, ``doc_image``,
``doc_industry_name``, ``doc_cate1_name`` … ``doc_cate4_name``, ``doc_attributes``. The query side
is undocumented, so it comes from a :class:`QueryColumns` mapping. Bad rows are skipped and
reported with their file and row number; good rows are kept; unreadable images are reported and
left out of the product (the product itself is kept).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moon.data.images import ImageLoadError, load_image
from moon.data.records import SPLITS, Product, Purchase, Query
from moon.data.store import ProductStore, StoreWriter
from moon.errors import ConfigError, DataError

CATEGORY_COLUMNS = ("doc_industry_name", "doc_cate1_name", "doc_cate2_name", "doc_cate3_name", "doc_cate4_name")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
DEFAULT_CACHE = Path(os.environ.get("MOON_CACHE", Path.home() / ".cache" / "moon")) / "mbe-images"


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
    A dict (already parsed) is accepted as is. Raises ``ValueError`` for a part with no ``:`` or
    an empty key.
    """
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return {str(k): [str(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in raw.items()}
    text = str(raw).strip()
    if not text or text.lower() in ("nan", "none", "null"):
        return {}
    out: dict[str, list[str]] = {}
    for part in text.split(",,"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"attribute part {part!r} is not key:value")
        values = [v.strip() for v in value.split("!!!") if v.strip()]
        bucket = out.setdefault(key, [])
        for v in values:
            if v not in bucket:
                bucket.append(v)
    return {k: v for k, v in out.items() if v}


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-made files
        return ""
    text = str(value).strip()
    return "" if text.lower() in ("nan", "none", "null") else text


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, row_dict)`` from a json / jsonl / parquet / csv file (row numbers from 1)."""
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, {"__error__": f"invalid JSON ({exc.msg})"}
                    continue
                yield i, row if isinstance(row, dict) else {"__error__": "not a JSON object"}
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from exc
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
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: unreadable parquet ({exc})") from exc
        i = 0
        for batch in pf.iter_batches(batch_size=2048):
            for row in batch.to_pylist():
                i += 1
                yield i, row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader, 1):
                yield i, row
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

    def format(self, max_lines: int = 20) -> str:
        lines = [
            f"imported {self.products} products, {self.queries} queries, {self.purchases} purchases, {self.images} images",
        ]
        for title, items in (("skipped rows", self.skipped_rows), ("images not available", self.missing_images)):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {x}" for x in items[:max_lines]]
                if len(items) > max_lines:
                    lines.append(f"  … {len(items) - max_lines} more")
        return "\n".join(lines)


class ImageResolver:
    """Finds the local file for an MBE ``doc_image`` value and copies it into the store.

    Order: a local path or ``file://`` URL; a file of the same name in ``images_dir``; the download
    cache; a download (only when ``download`` is set). Every image is decoded once with the safe
    loader before it is accepted.
    """

    def __init__(self, root: Path, images_dir: Path | None, cache_dir: Path, download: bool, base_dir: Path):
        self.root = root
        self.images_dir = images_dir
        self.cache_dir = cache_dir
        self.download = download
        self.base_dir = base_dir
        self.done: dict[str, str | None] = {}

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
            for base in ([self.images_dir] if self.images_dir else []) + [self.base_dir]:
                if (base / path).is_file():
                    return base / path, ""
                if (base / path.name).is_file():
                    return base / path.name, ""
        return path, ""

    @staticmethod
    def _cache_name(ref: str) -> str:
        suffix = Path(urllib.parse.urlparse(ref).path).suffix.lower()
        return hashlib.sha1(ref.encode()).hexdigest() + (suffix if suffix in IMAGE_SUFFIXES else ".img")

    def resolve(self, ref: str) -> tuple[str | None, str]:
        """Return (store-relative path or None, reason when None)."""
        if ref in self.done:
            return self.done[ref], "unavailable (see earlier report)"
        path, reason = self._candidate(ref)
        if path is None or not path.is_file():
            self.done[ref] = None
            return None, reason or "file not found"
        try:
            img = load_image(path)
        except ImageLoadError as exc:
            self.done[ref] = None
            return None, exc.reason
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        fmt = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") else ".png"
        rel = f"images/mbe/{digest}{fmt}"
        dest = self.root / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            if fmt == ".png" and path.suffix.lower() not in (".png",):
                img.save(dest, format="PNG")
            else:
                dest.write_bytes(path.read_bytes())
        self.done[ref] = rel
        return rel, ""


def _split_images(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [str(x).strip() for x in raw if _clean(x)]
    text = _clean(raw)
    if not text:
        return []
    if text.startswith("["):
        try:
            return [str(x).strip() for x in json.loads(text) if str(x).strip()]
        except json.JSONDecodeError:
            pass
    for sep in ("!!!", ",,", "|", ";"):
        if sep in text:
            return [x.strip() for x in text.split(sep) if x.strip()]
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
) -> tuple[ProductStore, ImportReport]:
    """Turn MBE-format files into a product store; returns the opened store and the report.

    ``sources`` are file paths, each optionally prefixed ``train=``/``val=``/``test=`` to set the
    split of the queries it yields (else ``split``).
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
    with StoreWriter(root, created=created, overwrite=overwrite) as writer:
        resolver = ImageResolver(
            writer.root,
            Path(images_dir) if images_dir else None,
            Path(cache_dir) if cache_dir else DEFAULT_CACHE,
            download,
            files[0][0].parent if files else Path("."),
        )
        products: dict[str, tuple[str, tuple[str, ...]]] = {}  # id → (title, category) for dup checks
        query_keys: dict[tuple[str, str, tuple[str, ...]], str] = {}
        written_queries: set[str] = set()
        n_query = 0
        iterator = ((p, s, i, row) for p, s in files for i, row in read_rows(p))
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="import-mbe", unit="row")
        for path, file_split, i, row in iterator:
            where = f"{path.name}:{i}"
            if "__error__" in row:
                report.skipped_rows.append(f"{where}: {row['__error__']}")
                continue
            pid = _clean(row.get("id"))
            title = _clean(row.get("doc_title"))
            if not pid:
                report.skipped_rows.append(f"{where}: no id")
                continue
            category = tuple(c for c in (_clean(row.get(col)) for col in CATEGORY_COLUMNS) if c)
            if pid in products:
                if products[pid] != (title, category):
                    report.skipped_rows.append(f"{where}: duplicate id {pid!r} with different content (first row kept)")
                    continue
            else:
                if not title:
                    report.skipped_rows.append(f"{where}: product {pid!r} has no title")
                    continue
                try:
                    attributes = parse_attributes(row.get("doc_attributes"))
                except ValueError as exc:
                    report.skipped_rows.append(f"{where}: unreadable attributes ({exc})")
                    continue
                images = []
                for ref in _split_images(row.get("doc_image")):
                    rel, reason = resolver.resolve(ref)
                    if rel is None:
                        report.missing_images.append(f"{where}: {ref}: {reason}")
                    else:
                        images.append(rel)
                writer.add_product(
                    Product(id=pid, title=title, images=images, category=list(category), attributes=attributes)
                )
                products[pid] = (title, category)
                report.products += 1
                report.images += len(images)
            if query_columns is None:
                continue
            text = _clean(row.get(query_columns.text)) if query_columns.text else ""
            qimages = []
            for col in query_columns.images:
                for ref in _split_images(row.get(col)):
                    rel, reason = resolver.resolve(ref)
                    if rel is None:
                        report.missing_images.append(f"{where}: query image {ref}: {reason}")
                    else:
                        qimages.append(rel)
            if not text and not qimages:
                report.skipped_rows.append(f"{where}: query has neither text nor a usable image")
                continue
            target = _clean(row.get(query_columns.product)) or pid
            if target not in products:
                report.skipped_rows.append(f"{where}: purchased product {target!r} is not (yet) in the data")
                continue
            qsplit = _clean(row.get(query_columns.split)) if query_columns.split else file_split
            if qsplit not in SPLITS:
                report.skipped_rows.append(f"{where}: split {qsplit!r} is not one of {', '.join(SPLITS)}")
                continue
            qid = _clean(row.get(query_columns.id)) if query_columns.id else ""
            key = (qsplit, text, tuple(qimages))
            if not qid:
                qid = query_keys.get(key) or f"q{n_query:08d}"
            if qid not in written_queries:
                writer.add_query(Query(id=qid, text=text or None, images=qimages, split=qsplit))
                written_queries.add(qid)
                query_keys[key] = qid
                n_query += 1
                report.queries += 1
            ts_raw = _clean(row.get(query_columns.timestamp)) if query_columns.timestamp else ""
            try:
                ts = int(float(ts_raw)) if ts_raw else 0
            except ValueError:
                ts = 0
            region = _clean(row.get(query_columns.region)) if query_columns.region else ""
            writer.add_purchase(Purchase(query_id=qid, product_id=target, timestamp=ts, region=region))
            report.purchases += 1
        writer.created["report"] = {
            "skipped_rows": len(report.skipped_rows),
            "missing_images": len(report.missing_images),
        }
    return ProductStore(root), report
