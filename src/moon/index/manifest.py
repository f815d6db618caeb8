"""The index manifest: ``INDEX_DIR/manifest.json`` (what was indexed, with which model, how well).

Layout of an index directory (documented in ``docs/serving.md``)::

    INDEX_DIR/
      manifest.json    format + version, model spec + fingerprint, dim, count, kind, params,
                       measured recall@10 of the approximate index vs exact search, store path
      vectors.faiss    the FAISS index (``faiss.write_index``; labels are int64)
      ids.parquet      label (int64) → product id (string)

Nothing is pickled: JSON, parquet and FAISS's own binary format only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moon.errors import DataError

FORMAT_NAME = "moon-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FAISS_FILE = "vectors.faiss"
IDS_FILE = "ids.parquet"
KINDS = ("exact", "hnsw", "ivfpq")


class IndexFormatError(DataError):
    """The directory is not a readable MOON index, or it does not match the model/store."""


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class IndexManifest:
    """What ``manifest.json`` holds.

    ``recall_at_10`` is the mean Recall@10 of this index against exact inner-product search,
    measured at build time on ``recall_queries`` indexed vectors used as queries (1.0 for
    ``exact``), when the index held ``recall_count`` vectors.
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
    metric: str = "inner_product"
    created: str = field(default_factory=utc_now)
    updated: str = field(default_factory=utc_now)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = MANIFEST_FILE) -> IndexManifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{source}: not a {FORMAT_NAME} manifest")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise IndexFormatError(
                f"{source}: index format version {data['version']} is newer than this MOON reads ({FORMAT_VERSION})"
            )
        if data.get("kind") not in KINDS:
            raise IndexFormatError(f"{source}: unknown index kind {data.get('kind')!r} (expected one of {KINDS})")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("model", "fingerprint", "dim", "kind", "store") if k not in data]
        if missing:
            raise IndexFormatError(f"{source}: missing field(s) {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def write_manifest(index_dir: str | os.PathLike, manifest: IndexManifest) -> None:
    """Write ``manifest.json`` atomically (temp file + rename)."""
    root = Path(index_dir)
    tmp = root / (MANIFEST_FILE + ".tmp")
    tmp.write_text(
        json.dumps(manifest.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    os.replace(tmp, root / MANIFEST_FILE)


def read_manifest(index_dir: str | os.PathLike) -> IndexManifest:
    root = Path(index_dir)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise IndexFormatError(f"{root}: no such directory")
    if not path.is_file():
        raise IndexFormatError(f"{root}: not a MOON index (no {MANIFEST_FILE}; build one with `moon index build`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: unreadable manifest ({exc})") from exc
    return IndexManifest.from_dict(data, source=str(path))
