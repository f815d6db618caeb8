"""The on-disk format of ``moon embed``: Parquet vector shards and the manifest that vouches for them.

Layout of a vectors directory (see ``docs/embed.md``)::

    VECTORS/
      manifest.json          format "moon-vectors" + version; model spec + embedder fingerprint +
                             dim; store (absolute + relative to VECTORS) and its product count;
                             shard size; the finished shards, each with its row range, the sha256
                             of its file and the sha256 of its ids
      shard-00000.parquet    id (string), vector (fixed_size_list<float32>[dim]): products
      shard-00001.parquet    [k·shard_size, (k+1)·shard_size) of the store, in store order
      …

A shard is written to a temporary file, flushed and renamed into place, and only then recorded in
the manifest (itself replaced atomically). After a crash a shard file is therefore either recorded
and whole, or not recorded and never read. Readers check each shard's sha256, schema, row count and
ids against the manifest and refuse anything else with a :class:`VectorFormatError`. Nothing is
pickled, and the manifest names its model only as data (it is never loaded from here).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moon.errors import DataError

FORMAT_NAME = "moon-vectors"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".parquet"
#: largest manifest read (100M products in 10,000-product shards is ~3 MB)
MAX_MANIFEST_BYTES = 64 << 20
_HASH_CHUNK = 8 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class VectorFormatError(DataError):
    """A vectors directory (or one of its shards) is missing, incomplete, damaged or foreign."""


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def shard_name(index: int) -> str:
    """``3`` → ``"shard-00003.parquet"``."""
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), …]`` of the shards of an ``n``-product store."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def ids_sha256(ids: Iterable[str]) -> str:
    """SHA-256 of a sequence of ids (each length-prefixed, so no two sequences collide by joining)."""
    h = hashlib.sha256()
    for pid in ids:
        raw = str(pid).encode("utf-8")
        h.update(struct.pack("<Q", len(raw)))
        h.update(raw)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def shard_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class ShardRecord:
    """One finished shard as the manifest records it: rows ``start … start + rows`` of the store."""

    index: int
    file: str
    start: int
    rows: int
    sha256: str
    ids_sha256: str

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ShardRecord:
        if not isinstance(data, dict):
            raise VectorFormatError(f"{source}: a shard entry must be an object, got {data!r:.80}")
        try:
            record = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except KeyError as exc:
            raise VectorFormatError(f"{source}: a shard entry lacks {exc.args[0]!r}") from None
        if not all(_is_count(v) for v in (record.index, record.start, record.rows)):
            raise VectorFormatError(f"{source}: shard entry {data!r:.120}: index/start/rows must be integers >= 0")
        if record.file != shard_name(record.index):
            raise VectorFormatError(f"{source}: shard {record.index} must be named {shard_name(record.index)!r}")
        for name in ("sha256", "ids_sha256"):
            value = getattr(record, name)
            if not (isinstance(value, str) and _SHA256.match(value)):
                raise VectorFormatError(f"{source}: shard {record.index}: {name} must be 64 hex digits")
        return record


@dataclass
class VectorsManifest:
    """What ``manifest.json`` of a vectors directory holds (see the module docstring).

    ``model`` is the spec the user gave; ``fingerprint`` / ``dim`` are those of the embedder that
    encoded every shard; ``store`` the store's absolute path, ``store_relative`` the same from the
    vectors directory.
    """

    model: str
    fingerprint: str
    dim: int
    store: str
    products: int
    shard_size: int
    store_relative: str | None = None
    shards: list[ShardRecord] = field(default_factory=list)
    created: str = field(default_factory=utc_now)
    updated: str = field(default_factory=utc_now)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def shards_total(self) -> int:
        return len(shard_ranges(self.products, self.shard_size))

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.shards_total

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shards"] = [asdict(s) for s in sorted(self.shards, key=lambda s: s.index)]
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MANIFEST_FILE) -> VectorsManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise VectorFormatError(f"{source}: not a {FORMAT_NAME} manifest")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise VectorFormatError(f"{source}: version must be an integer >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise VectorFormatError(f"{source}: format version {version} is newer than this MOON reads")
        missing = [k for k in ("model", "fingerprint", "dim", "store", "products", "shard_size") if k not in data]
        if missing:
            raise VectorFormatError(f"{source}: missing field(s) {', '.join(missing)}")
        shards = data.get("shards", [])
        if not isinstance(shards, list):
            raise VectorFormatError(f"{source}: shards must be a list")
        known = set(cls.__dataclass_fields__) - {"shards"}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.shards = [ShardRecord.from_dict(s, source) for s in shards]
        manifest.validate(source)
        return manifest

    def validate(self, source: str = MANIFEST_FILE) -> None:
        """Types and ranges of every field, and shards that fit the store's rows, each once."""

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise VectorFormatError(f"{source}: {name} must be {what}, got {getattr(self, name)!r:.80}")

        for name in ("model", "fingerprint", "store", "created", "updated"):
            need(isinstance(getattr(self, name), str), name, "a string")
        need(self.store_relative is None or isinstance(self.store_relative, str), "store_relative", "a string or null")
        need(bool(self.fingerprint), "fingerprint", "a non-empty string")
        need(_is_count(self.dim) and 1 <= self.dim <= 1 << 16, "dim", "an integer in 1..65536")
        need(_is_count(self.products) and self.products >= 1, "products", "an integer >= 1")
        need(_is_count(self.shard_size) and self.shard_size >= 1, "shard_size", "an integer >= 1")
        ranges = shard_ranges(self.products, self.shard_size)
        seen: set[int] = set()
        for s in self.shards:
            if s.index >= len(ranges) or s.index in seen:
                raise VectorFormatError(
                    f"{source}: shard {s.index} is out of range or listed twice ({len(ranges)} shards in all)"
                )
            seen.add(s.index)
            start, stop = ranges[s.index]
            if (s.start, s.rows) != (start, stop - start):
                raise VectorFormatError(
                    f"{source}: shard {s.index} records rows {s.start:,}+{s.rows:,}, "
                    f"the shard size gives {start:,}+{stop - start:,}"
                )


def write_manifest(directory: str | os.PathLike, manifest: VectorsManifest) -> None:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename)."""
    root = Path(directory)
    manifest.updated = utc_now()
    tmp = root / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST_FILE)


def read_manifest(directory: str | os.PathLike) -> VectorsManifest:
    """``VECTORS/manifest.json``, validated; :class:`VectorFormatError` for anything else."""
    root = Path(directory)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise VectorFormatError(f"{root}: no such directory")
    if not path.is_file():
        raise VectorFormatError(f"{root}: not a vectors directory (no {MANIFEST_FILE}; write one with `moon embed`)")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise VectorFormatError(f"{path}: {size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise VectorFormatError(f"{path}: unreadable manifest ({exc})") from exc
    except RecursionError as exc:
        raise VectorFormatError(f"{path}: unreadable manifest (nested too deeply)") from exc
    return VectorsManifest.from_dict(data, source=str(path))


def write_shard(
    directory: str | os.PathLike, index: int, start: int, ids: Sequence[str], vectors: np.ndarray
) -> ShardRecord:
    """Write shard ``index`` (rows ``start …`` of the store) atomically and return its record.

    ``vectors`` is float32 ``(len(ids), dim)``. The file appears under its final name only once it
    is complete (temporary file, fsync, rename); recording it in the manifest is the caller's job.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"{len(ids)} ids for vectors of shape {vectors.shape}")
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays(
        [pa.array([str(i) for i in ids], type=pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=shard_schema(dim),
    )
    root = Path(directory)
    final = root / shard_name(index)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardRecord(
        index=index, file=final.name, start=start, rows=len(ids), sha256=digest, ids_sha256=ids_sha256(ids)
    )


def check_shard_file(path: Path, record: ShardRecord) -> None:
    """Raise :class:`VectorFormatError` unless ``path`` exists and has the recorded sha256."""
    if not path.is_file():
        raise VectorFormatError(f"{path}: missing (the manifest records it as finished)")
    digest = file_sha256(path)
    if digest != record.sha256:
        raise VectorFormatError(
            f"{path}: damaged or replaced (sha256 {digest[:12]}…, the manifest records {record.sha256[:12]}…)"
        )


def read_shard(directory: str | os.PathLike, record: ShardRecord, dim: int) -> tuple[list[str], np.ndarray]:
    """The ids and float32 ``(rows, dim)`` vectors of a recorded shard, checked against ``record``
    (file sha256, schema, row count, ids, finite values); :class:`VectorFormatError` otherwise."""
    path = Path(directory) / record.file
    check_shard_file(path, record)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise VectorFormatError(f"{path}: unreadable parquet ({exc})") from exc
    want = shard_schema(dim)
    if not table.schema.remove_metadata().equals(want):
        raise VectorFormatError(f"{path}: schema {table.schema.remove_metadata()}, expected {want}")
    if table.num_rows != record.rows:
        raise VectorFormatError(f"{path}: {table.num_rows:,} rows, the manifest records {record.rows:,}")
    ids = table.column("id").to_pylist()
    if any(i is None for i in ids) or ids_sha256(ids) != record.ids_sha256:
        raise VectorFormatError(f"{path}: its ids differ from the ones the manifest records")
    column = table.column("vector").combine_chunks()
    if column.null_count:
        raise VectorFormatError(f"{path}: {column.null_count:,} null vectors")
    vectors = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), dim)
    if not np.isfinite(vectors).all():
        raise VectorFormatError(f"{path}: holds NaN or infinite values")
    return ids, vectors


@dataclass
class VectorShards:
    """A finished vectors directory, opened for reading: ``for ids, vectors in shards: …``."""

    root: Path
    manifest: VectorsManifest

    @classmethod
    def open(cls, directory: str | os.PathLike) -> VectorShards:
        """Open ``directory``; :class:`VectorFormatError` when the manifest is unreadable or some shards
        are not finished yet (the error says how many and how to finish them)."""
        root = Path(directory)
        manifest = read_manifest(root)
        if not manifest.complete:
            raise VectorFormatError(
                f"{root}: {len(manifest.shards):,} of {manifest.shards_total:,} shards are finished; "
                "rerun `moon embed` with the same --data/--model/--out to embed the rest"
            )
        return cls(root, manifest)

    def __len__(self) -> int:
        return self.manifest.products

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, vectors)`` per shard in store order, each checked (see :func:`read_shard`)."""
        for record in sorted(self.manifest.shards, key=lambda s: s.index):
            yield read_shard(self.root, record, self.manifest.dim)
