"""The index manifest: ``INDEX_DIR/manifest.json`` (what was indexed, with which model, how well).

Layout of an index directory (version 3; ``N`` is the generation, see :mod:`moon.index.atomic`)::

    INDEX_DIR/
      manifest.json      format + version, model reference + fingerprint, dim, count, kind, params,
                         measured recall@10 of the approximate index vs exact search on held-out
                         queries (and which ones), store reference, and ``generation`` + ``files``:
                         the name, size and sha256 of each data file below
      vectors.N.faiss    the FAISS index (``faiss.write_index``; labels are int64)
      ids.N.parquet      label (int64) → product id (string)
      rerank.N.f32       ``ivfpq`` only: the full float32 vectors by label, for the exact re-rank, in
                         one or more segments (each a run of labels; ``add`` appends a segment)
      .moon-index.lock   the writers' lock (``fcntl.flock``)

A data file never changes once written; a save writes generation ``N+1`` beside it and then
replaces ``manifest.json``. Nothing is pickled: JSON, parquet, raw float32 and FAISS's own binary
format only. Version 2 added ``model_relative`` / ``store_relative`` (paths relative to the index
directory) and ``recall_source``; version 3 ``generation`` and ``files``. Older manifests (no
``files``) still open: their data files have the fixed names ``vectors.faiss``, ``ids.parquet``
and ``rerank.f32`` (:data:`LEGACY_FILES`), unchecked, and their next save writes version 3.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moon.errors import DataError

FORMAT_NAME = "moon-index"
FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
#: data file names of manifests before version 3 (no ``files`` field)
FAISS_FILE = "vectors.faiss"
IDS_FILE = "ids.parquet"
RERANK_FILE = "rerank.f32"
#: what older writers left behind (temporary files, the build's spool); deleted by the next save
LEGACY_FILES = (FAISS_FILE, IDS_FILE, RERANK_FILE, FAISS_FILE + ".tmp", IDS_FILE + ".tmp", MANIFEST_FILE + ".tmp",
                "vectors.spool.npy")  # fmt: skip
#: data files of version 3: ``vectors.N.faiss``, ``ids.N.parquet``, ``rerank.N.f32``
GENERATION_FILE = re.compile(r"^(vectors|ids|rerank)\.([0-9]{1,15})\.(faiss|parquet|f32)$")
FILE_SUFFIX = {"vectors": "faiss", "ids": "parquet", "rerank": "f32"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
RECALL_SOURCES = ("exact", "queries", "held-out vectors", "given queries")
KINDS = ("exact", "hnsw", "ivfpq")


class IndexFormatError(DataError):
    """The directory is not a readable MOON index, or it does not match the model/store."""


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class IndexManifest:
    """What ``manifest.json`` holds.

    ``recall_at_10`` is the mean Recall@10 of this index against exact inner-product search,
    measured at build time on ``recall_queries`` queries that are not in the index, when it held
    ``recall_count`` vectors (1.0 for ``exact``). ``recall_source`` says which queries:
    ``"queries"`` — the store's own queries, encoded by the model; ``"held-out vectors"`` — product
    vectors left out of the index while measuring (added afterwards); ``"given queries"`` — vectors
    the caller passed; ``"exact"`` — nothing to measure.

    ``model`` / ``store`` are absolute paths when they name directories, ``model_relative`` /
    ``store_relative`` the same paths relative to the index directory (see
    :mod:`moon.index.references`).

    ``generation`` counts the saves; ``files`` names the data files of this generation:
    ``{"vectors": REC, "ids": REC, "rerank": [REC + {"start", "rows"}, …]}`` with
    ``REC = {"name", "bytes", "sha256"}`` (empty in manifests before version 3).
    """

    model: str
    fingerprint: str
    dim: int
    kind: str
    store: str
    count: int = 0
    next_label: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    recall_at_10: float | None = None
    recall_queries: int = 0
    recall_count: int = 0
    recall_source: str | None = None
    model_relative: str | None = None
    store_relative: str | None = None
    metric: str = "inner_product"
    created: str = field(default_factory=utc_now)
    updated: str = field(default_factory=utc_now)
    generation: int = 0
    files: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = MANIFEST_FILE) -> IndexManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{source}: not a {FORMAT_NAME} manifest")
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise IndexFormatError(f"{source}: version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"{source}: index format version {data['version']} is newer than this MOON reads ({FORMAT_VERSION})"
            )
        if data.get("kind") not in KINDS:
            raise IndexFormatError(f"{source}: unknown index kind {data.get('kind')!r} (expected one of {KINDS})")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("model", "fingerprint", "dim", "kind", "store") if k not in data]
        if missing:
            raise IndexFormatError(f"{source}: missing field(s) {', '.join(missing)}")
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.validate(source)
        return manifest

    def validate(self, source: str = MANIFEST_FILE) -> None:
        """Types and ranges of every field (a hand-edited or crafted manifest fails here, by name)."""

        def need(ok: bool, field_name: str, what: str) -> None:
            if not ok:
                raise IndexFormatError(f"{source}: {field_name} must be {what}, got {getattr(self, field_name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("model", "fingerprint", "store", "metric", "created", "updated"):
            need(isinstance(getattr(self, name), str), name, "a string")
        for name in ("model_relative", "store_relative", "recall_source"):
            need(getattr(self, name) is None or isinstance(getattr(self, name), str), name, "a string or null")
        need(is_int(self.dim) and 1 <= self.dim <= 1 << 16, "dim", "an integer in 1..65536")
        for name in ("count", "next_label", "recall_queries", "recall_count", "version"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(isinstance(self.params, dict), "params", "an object")
        for key, value in self.params.items():
            if not is_int(value) or value < 0:
                raise IndexFormatError(f"{source}: params.{key} must be an integer >= 0, got {value!r}")
        need(
            self.recall_at_10 is None
            or (
                isinstance(self.recall_at_10, (int, float))
                and not isinstance(self.recall_at_10, bool)
                and 0.0 <= self.recall_at_10 <= 1.0
            ),
            "recall_at_10",
            "a number in [0, 1] or null",
        )
        need(
            self.recall_source is None or self.recall_source in RECALL_SOURCES,
            "recall_source",
            f"one of {RECALL_SOURCES}",
        )
        need(self.metric == "inner_product", "metric", '"inner_product"')
        need(is_int(self.generation) and self.generation >= 0, "generation", "an integer >= 0")
        self._validate_files(source)

    def _validate_files(self, source: str) -> None:
        """``files``: plain names of this generation's pattern, sizes, sha256s, and re-rank segments
        that cover labels ``0 … next_label-1`` in order (see the class docstring)."""

        def bad(what: str) -> IndexFormatError:
            return IndexFormatError(f"{source}: files{what}")

        files = self.files
        if not isinstance(files, dict):
            raise IndexFormatError(f"{source}: files must be an object, got {files!r}"[:300])
        if not files:
            if self.version >= 3:
                raise bad(" is missing (a version 3 manifest names its data files)")
            return
        if set(files) != {"vectors", "ids", "rerank"}:
            raise bad(f" must have the keys ids, rerank, vectors, got {sorted(files)}")

        def record(key: str, rec: Any, extra: tuple[str, ...] = ()) -> None:
            if not isinstance(rec, dict) or set(rec) != {"name", "bytes", "sha256", *extra}:
                raise bad(f".{key} must be an object with {', '.join(sorted({'name', 'bytes', 'sha256', *extra}))}")
            name = rec["name"]
            m = GENERATION_FILE.match(name) if isinstance(name, str) else None
            if m is None or m.group(1) != key.split("[")[0] or m.group(3) != FILE_SUFFIX[m.group(1)]:
                raise bad(f".{key}.name must be a file name like {key.split('[')[0]}.N.{FILE_SUFFIX[key.split('[')[0]]}, "
                          f"got {name!r}"[:300])  # fmt: skip
            for k in ("bytes", *extra):
                if not isinstance(rec[k], int) or isinstance(rec[k], bool) or rec[k] < 0:
                    raise bad(f".{key}.{k} must be an integer >= 0, got {rec[k]!r}"[:300])
            if not isinstance(rec["sha256"], str) or not _SHA256.match(rec["sha256"]):
                raise bad(f".{key}.sha256 must be 64 hex digits, got {rec['sha256']!r}"[:300])

        record("vectors", files["vectors"])
        record("ids", files["ids"])
        segments = files["rerank"]
        if not isinstance(segments, list):
            raise bad(".rerank must be a list")
        end = 0
        for i, seg in enumerate(segments):
            key = f"rerank[{i}]"
            record(key, seg, ("start", "rows"))
            if seg["start"] != end or seg["rows"] < 1:
                raise bad(f".{key} must start at label {end} with at least one row, got {seg['start']}, {seg['rows']}")
            if seg["bytes"] != seg["rows"] * self.dim * 4:
                raise bad(f".{key}.bytes must be rows·dim·4 = {seg['rows'] * self.dim * 4}, got {seg['bytes']}")
            end += seg["rows"]
        expected = self.next_label if self.kind == "ivfpq" and int(self.params.get("rerank", 0)) > 0 else 0
        if end != expected:
            raise bad(f".rerank covers {end} labels, expected {expected} (next_label of an ivfpq index with rerank)")
        names = [files["vectors"]["name"], files["ids"]["name"], *(s["name"] for s in segments)]
        if len(set(names)) != len(names):
            raise bad(" names one file twice")

    def data_files(self) -> list[str]:
        """The data files this manifest uses (fixed names before version 3)."""
        if not self.files:
            return [FAISS_FILE, IDS_FILE, RERANK_FILE]
        return [self.files["vectors"]["name"], self.files["ids"]["name"], *(s["name"] for s in self.files["rerank"])]


def manifest_bytes(manifest: IndexManifest) -> bytes:
    """The text of ``manifest.json``."""
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


MAX_MANIFEST_BYTES = 1 << 20


def read_manifest(index_dir: str | os.PathLike) -> IndexManifest:
    """``INDEX_DIR/manifest.json``, validated; :class:`IndexFormatError` for anything else."""
    root = Path(index_dir)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise IndexFormatError(f"{root}: no such directory")
    if not path.is_file():
        raise IndexFormatError(f"{root}: not a MOON index (no {MANIFEST_FILE}; build one with `moon index build`)")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise IndexFormatError(
                f"{path}: {path.stat().st_size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,}"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise IndexFormatError(f"{path}: unreadable manifest ({exc})") from exc
    except RecursionError as exc:
        raise IndexFormatError(f"{path}: unreadable manifest (nested too deeply)") from exc
    return IndexManifest.from_dict(data, source=str(path))
