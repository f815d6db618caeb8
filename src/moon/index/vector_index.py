"""An index directory opened in memory: FAISS index + label → product id table + manifest.

Reading and writing follow :mod:`moon.index.atomic`: a reader sees the whole old index or the whole
new one, never a mix; every save writes a new generation of files and replaces ``manifest.json``
last; a file that does not belong to the manifest (a half-saved or mixed-up copy) is refused on
open with one :class:`IndexFormatError` line; writers hold the index's lock.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moon.errors import ConfigError, DataError
from moon.index.atomic import (
    HashingFile,
    IndexConflictError,
    IndexSaveError,
    check_index_target,
    fsync_dir,
    hash_open_file,
    highest_generation,
    index_lock,
    new_staging,
    remove_leftovers,
    write_file,
)
from moon.index.kinds import apply_search_params, describe_faiss, faiss_kind, new_faiss_index
from moon.index.manifest import (
    FAISS_FILE,
    FILE_SUFFIX,
    FORMAT_VERSION,
    IDS_FILE,
    MANIFEST_FILE,
    RERANK_FILE,
    IndexFormatError,
    IndexManifest,
    manifest_bytes,
    read_manifest,
    utc_now,
)

IDS_SCHEMA = pa.schema([("label", pa.int64()), ("id", pa.string())])
#: how many times ``open`` reads an index again when a writer replaced it while it was being read
OPEN_ATTEMPTS = 10
#: re-rank segments are merged into one when a save would leave more than this many
MAX_RERANK_SEGMENTS = 16
#: re-rank segments up to this size are checked against their sha256 on open (larger ones, which
#: are memory-mapped precisely so that they are not read whole, by size and generation only)
RERANK_HASH_LIMIT = 1 << 30


@dataclass(frozen=True)
class Neighbour:
    """One search result: product id and inner-product score (cosine for unit vectors)."""

    id: str
    score: float


@dataclass
class _Segment:
    """Re-rank vectors of labels ``start … start+rows-1``: memory-mapped rows of one file."""

    start: int
    rows: int
    array: np.ndarray
    record: dict[str, Any] | None  # its ``files.rerank`` entry; None for a file of the old layout


@dataclass
class _Pending:
    """Re-rank vectors added since the last save, appended to a file in the staging folder."""

    start: int
    rows: int
    path: Path
    array: np.ndarray | None = None


def _mismatch(path: Path, rec: dict[str, Any], size: int, digest: str | None) -> IndexFormatError:
    got = f"{size:,} bytes" + (f", sha256 {digest[:12]}" if digest else "")
    return IndexFormatError(
        f"{path}: does not belong to this index ({got}; its manifest.json records {rec['bytes']:,} bytes, "
        f"sha256 {rec['sha256'][:12]}): a half-saved or mixed-up copy of the folder; restore the whole index "
        "folder, or rebuild the index"
    )


def _open_data_file(root: Path, name: str) -> Any:
    path = root / name
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise IndexFormatError(
            f"{path}: missing, but {MANIFEST_FILE} names it (an incomplete copy of the index folder?); "
            "copy the whole folder again, or rebuild the index"
        ) from None
    except OSError as exc:
        raise IndexFormatError(f"{path}: unreadable ({exc.strerror or exc})") from exc


def _check_size(f: Any, path: Path, rec: dict[str, Any] | None) -> None:
    if rec is not None and os.fstat(f.fileno()).st_size != rec["bytes"]:
        raise _mismatch(path, rec, os.fstat(f.fileno()).st_size, None)


def _read_faiss(f: Any, path: Path, rec: dict[str, Any] | None) -> faiss.Index:
    """Read and (with ``rec``) check the FAISS file in one pass: it is hashed as FAISS reads it."""
    _check_size(f, path, rec)
    sha = hashlib.sha256()

    def read(n: int) -> bytes:
        chunk = f.read(n)
        sha.update(chunk)
        return chunk

    index, error = None, None
    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(read))
    except RuntimeError as exc:
        error = exc
    if rec is not None:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
        if sha.hexdigest() != rec["sha256"]:
            raise _mismatch(path, rec, rec["bytes"], sha.hexdigest())
    if index is None:
        raise IndexFormatError(f"{path}: unreadable FAISS index ({str(error).splitlines()[-1]})") from error
    return index


def _read_ids(f: Any, path: Path, rec: dict[str, Any] | None) -> tuple[list[int], list[str]]:
    _check_size(f, path, rec)
    data = f.read()
    if rec is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != rec["sha256"]:
            raise _mismatch(path, rec, len(data), digest)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # noqa: BLE001 - arrow raises several types for broken files
        raise IndexFormatError(f"{path}: unreadable ({exc})") from exc
    schema = {f.name: f.type for f in table.schema}
    if schema.get("label") != pa.int64() or schema.get("id") != pa.string():
        got = ", ".join(f"{f.name} ({f.type})" for f in table.schema) or "no columns"
        raise IndexFormatError(
            f"{path}: expected columns label (int64) and id (string), got {got}; restore the index folder or rebuild it"
        )
    labels, ids = table.column("label").to_pylist(), table.column("id").to_pylist()
    for name, values in (("label", labels), ("id", ids)):
        if None in values:
            rows = [i for i, v in enumerate(values) if v is None]
            raise IndexFormatError(
                f"{path}: {len(rows):,} null {name}{'s' if len(rows) > 1 else ''} (row {rows[0]}"
                f"{' …' if len(rows) > 1 else ''}); restore the index folder or rebuild it"
            )
        first: dict[Any, int] = {}
        for row, value in enumerate(values):
            if value in first:
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
                raise IndexFormatError(
                    f"{path}: {name} {shown} appears twice (rows {first[value]} and {row}); "
                    "restore the index folder or rebuild it"
                )
            first[value] = row
    return labels, ids


class VectorIndex:
    """Product vectors searchable by inner product, with incremental add (upsert) and remove.

    Open one with :meth:`open` (an existing directory), :meth:`edit` (the same, holding the index's
    lock, for a read-modify-write) or :meth:`create` (a new, empty one); changes stay in memory
    until :meth:`save` — except the re-rank vectors of ``ivfpq``, which go to a file in the
    staging folder as they are added and become a segment ``rerank.N.f32`` when saved.

    ``ivfpq`` with ``params["rerank"] = R > 0`` answers a top-k search by asking the compressed
    index for ``R·k`` candidates and ranking those by their exact inner products with the full
    vectors (memory-mapped from the ``rerank`` files: 4·dim bytes per vector on disk, only the rows
    touched in memory), so its scores are exact and its recall is that of the candidate list.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        manifest: IndexManifest,
        index: faiss.Index,
        ids: dict[int, str],
        *,
        segments: Sequence[_Segment] = (),
        base: dict[str, Any] | None = None,
    ):
        self.root = Path(root)
        self.manifest = manifest
        self.faiss = index
        self._id_of: dict[int, str] = dict(ids)
        self._label_of: dict[str, int] = {pid: label for label, pid in self._id_of.items()}
        self._segments: list[_Segment] = list(segments)
        self._pending: _Pending | None = None
        self._staging: Path | None = None
        self._cleanup: weakref.finalize | None = None
        #: the manifest as it was on disk when this index was opened or last saved (None: create())
        self._base = base

    @property
    def rerank(self) -> int:
        """Candidates per result for the exact re-rank (0: none; only ``ivfpq`` has one)."""
        return int(self.manifest.params.get("rerank", 0)) if self.manifest.kind == "ivfpq" else 0

    # ------------------------------------------------------------------ open / create / save
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        *,
        model: str,
        fingerprint: str,
        dim: int,
        kind: str,
        store: str,
        params: dict[str, Any],
    ) -> VectorIndex:
        """A new empty index; nothing is written to ``root`` until :meth:`save`, which replaces an
        index already there as a whole."""
        manifest = IndexManifest(
            model=model, fingerprint=fingerprint, dim=int(dim), kind=kind, store=store, params=params
        )
        return cls(root, manifest, new_faiss_index(kind, int(dim), params), {})

    @classmethod
    def open(cls, root: str | os.PathLike) -> VectorIndex:
        """Load ``manifest.json`` and the files it names (no pickle anywhere), each checked against
        the size and sha256 the manifest records.

        No lock is needed: when a file is gone or does not match because a writer saved the index
        meanwhile (the manifest changed), the index is read again (up to :data:`OPEN_ATTEMPTS`
        times); with an unchanged manifest the mismatch is the error."""
        root = Path(root)
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            manifest = read_manifest(root)
            try:
                try:
                    return cls._load(root, manifest)
                except OSError as exc:  # a read error of a file that was there when opened
                    raise IndexFormatError(f"{root}: unreadable index file ({exc})") from exc
            except IndexFormatError as exc:
                try:
                    changed = read_manifest(root).to_dict() != manifest.to_dict()
                except IndexFormatError:
                    changed = True
                if not changed:
                    raise
                if attempt == OPEN_ATTEMPTS:
                    raise IndexFormatError(
                        f"{root}: the index was saved again while it was being read, {OPEN_ATTEMPTS} times in a row "
                        "(a writer saving without pause?); try again"
                    ) from exc
            time.sleep(min(0.2, 0.005 * attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    @classmethod
    def _load(cls, root: Path, manifest: IndexManifest) -> VectorIndex:
        files = manifest.files
        dim = manifest.dim
        rerank = manifest.kind == "ivfpq" and int(manifest.params.get("rerank", 0)) > 0
        with contextlib.ExitStack() as stack:
            # open every file first, right after reading the manifest: a writer may delete them later
            if files:
                vec_rec, ids_rec, seg_recs = files["vectors"], files["ids"], list(files["rerank"])
                handles = [stack.enter_context(_open_data_file(root, r["name"])) for r in (vec_rec, ids_rec, *seg_recs)]
            else:  # before version 3: fixed names, nothing recorded to check them against
                vec_rec = ids_rec = None
                seg_recs = [None] if rerank else []
                names = [FAISS_FILE, IDS_FILE] + ([RERANK_FILE] if rerank else [])
                handles = [stack.enter_context(_open_data_file(root, n)) for n in names]
            vectors_path = root / (vec_rec["name"] if vec_rec else FAISS_FILE)
            ids_path = root / (ids_rec["name"] if ids_rec else IDS_FILE)
            index = _read_faiss(handles[0], vectors_path, vec_rec)
            if faiss_kind(index) != manifest.kind:  # read before search parameters are applied to it
                raise IndexFormatError(
                    f"{vectors_path}: holds {describe_faiss(index)}, but manifest.json says kind {manifest.kind!r} "
                    "(a mixed-up copy?); restore the index folder or rebuild the index"
                )
            labels, ids = _read_ids(handles[1], ids_path, ids_rec)  # one row per label and per id
            if index.ntotal != len(ids) or index.d != dim:
                raise IndexFormatError(
                    f"{root}: inconsistent index ({index.ntotal} vectors of dim {index.d}, {len(ids)} ids, "
                    f"manifest dim {dim}); rebuild it"
                )
            if labels and not 0 <= min(labels) <= max(labels) < manifest.next_label:
                raise IndexFormatError(f"{ids_path}: labels outside 0 … next_label-1; rebuild the index")
            segments = []
            for rec, f in zip(seg_recs, handles[2:], strict=True):
                segments.extend(cls._map_segment(root, manifest, rec, f))
        apply_search_params(index, manifest.kind, manifest.params)
        return cls(root, manifest, index, dict(zip(labels, ids, strict=True)), segments=segments,
                   base=copy.deepcopy(manifest.to_dict()))  # fmt: skip

    @staticmethod
    def _map_segment(root: Path, manifest: IndexManifest, rec: dict[str, Any] | None, f: Any) -> list[_Segment]:
        dim = manifest.dim
        size = os.fstat(f.fileno()).st_size
        if rec is None:  # rerank.f32 of the old layout: rows past next_label were never saved
            path, start, rows = root / RERANK_FILE, 0, manifest.next_label
            if size < rows * dim * 4:
                raise IndexFormatError(f"{path}: {size:,} bytes, the index needs {rows * dim * 4:,} (rebuild it)")
        else:
            path, start, rows = root / rec["name"], rec["start"], rec["rows"]
            _check_size(f, path, rec)
            if size <= RERANK_HASH_LIMIT:
                got = hash_open_file(f)
                if got != (rec["bytes"], rec["sha256"]):
                    raise _mismatch(path, rec, *got)
        if rows == 0:
            return []
        array = np.memmap(f, dtype="<f4", mode="r", shape=(rows, dim))  # the mapping outlives the file's name
        return [_Segment(start, rows, array, rec)]

    @classmethod
    @contextlib.contextmanager
    def edit(cls, root: str | os.PathLike) -> Iterator[VectorIndex]:
        """Open the index holding its lock, for a read-modify-write; call :meth:`save` inside::

            with VectorIndex.edit(path) as index:
                index.remove(["p1"])
                index.save()

        Other writers (``moon index add/remove``, another ``edit``) wait; readers do not."""
        read_manifest(root)  # a folder that is not an index gets no lock file
        with index_lock(root):
            index = cls.open(root)
            try:
                yield index
            finally:
                index.discard()

    def discard(self) -> None:
        """Drop unsaved re-rank rows (the staging folder); the index on disk is unchanged."""
        if self._cleanup is not None:
            self._cleanup()
        self._cleanup = self._staging = self._pending = None

    def _staging_dir(self) -> Path:
        if self._staging is None:
            check_index_target(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            self._staging = new_staging(self.root)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._staging, True)
        return self._staging

    def save(self) -> None:
        """Write the index as a new generation and switch ``manifest.json`` to it (see
        :mod:`moon.index.atomic`): readers see the old index until the manifest is replaced, the
        new one after; an error or a kill leaves the old one as it was.

        Holds the index's lock. Raises :class:`IndexConflictError` when the index on disk was saved
        by someone else after this copy was opened (nothing is written then), and
        :class:`ConfigError` when the folder holds a manifest that is not an index's."""
        check_index_target(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        with index_lock(self.root):
            check_index_target(self.root)
            try:
                on_disk: IndexManifest | None = read_manifest(self.root)
            except IndexFormatError:
                on_disk = None
            if self._base is not None and (on_disk is None or on_disk.to_dict() != self._base):
                now = "no readable index" if on_disk is None else f"generation {on_disk.generation}"
                raise IndexConflictError(
                    f"{self.root}: the index was saved by another writer after this copy was opened (generation "
                    f"{self._base.get('generation', 0)}, now {now}); nothing was written: open it again and repeat "
                    "the change (moon index add/remove and VectorIndex.edit hold the index's lock for this)"
                )
            generation = 1 + max(self.manifest.generation, on_disk.generation if on_disk else 0,
                                 highest_generation(self.root))  # fmt: skip
            self._commit(generation)

    def _commit(self, generation: int) -> None:
        staging = self._staging_dir()
        m = self.manifest
        before = {k: copy.deepcopy(getattr(m, k)) for k in ("count", "updated", "generation", "files", "version")}
        moved: list[Path] = []
        new_files: list[str] = []
        try:
            name = f"vectors.{generation}.{FILE_SUFFIX['vectors']}"
            out = HashingFile(staging / name)
            faiss.write_index(self.faiss, faiss.PyCallbackIOWriter(out.write))
            vectors = {"name": name, **out.close()}
            new_files.append(name)

            labels = sorted(self._id_of)
            table = pa.Table.from_pydict({"label": labels, "id": [self._id_of[x] for x in labels]}, schema=IDS_SCHEMA)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            name = f"ids.{generation}.{FILE_SUFFIX['ids']}"
            ids = {"name": name, **write_file(staging / name, sink.getvalue().to_pybytes())}
            new_files.append(name)

            segments, merged = self._stage_rerank(staging, generation)
            new_files.extend(s["name"] for s in segments if (staging / s["name"]).exists())

            m.count = len(self)
            m.updated = utc_now()
            m.generation = generation
            m.files = {"vectors": vectors, "ids": ids, "rerank": segments}
            if m.version >= 2:  # version 1 keeps its number: its model/store paths are read the v1 way
                m.version = FORMAT_VERSION
            m.validate(str(self.root / MANIFEST_FILE))
            write_file(staging / MANIFEST_FILE, manifest_bytes(m))

            for name in new_files:  # new names: nothing a reader of the old manifest uses is touched
                os.replace(staging / name, self.root / name)
                moved.append(self.root / name)
            fsync_dir(self.root)
            os.replace(staging / MANIFEST_FILE, self.root / MANIFEST_FILE)  # readers switch here
        except BaseException as exc:
            for path in moved:
                with contextlib.suppress(OSError):
                    path.unlink()
            for name in new_files:
                with contextlib.suppress(OSError):
                    (staging / name).unlink()
            with contextlib.suppress(OSError):
                (staging / MANIFEST_FILE).unlink()
            for key, value in before.items():
                setattr(m, key, value)
            if isinstance(exc, OSError):
                raise IndexSaveError(
                    f"{self.root}: could not save the index ({exc}); the index on disk is unchanged"
                ) from exc
            raise
        fsync_dir(self.root)
        # the new generation is in place: map its re-rank segment(s), drop the staging folder
        self._remap_segments(segments, merged)
        self.discard()
        self._base = copy.deepcopy(m.to_dict())
        remove_leftovers(self.root, keep={MANIFEST_FILE, *m.data_files()})

    # ------------------------------------------------------------------ exact re-rank (ivfpq)
    def _stage_rerank(self, staging: Path, generation: int) -> tuple[list[dict[str, Any]], bool]:
        """The ``files.rerank`` list of the new generation, with its new file staged (the pending
        rows, or — beyond :data:`MAX_RERANK_SEGMENTS`, or for a ``rerank.f32`` of the old layout —
        every row merged into one file). Returns ``(segments, merged)``."""
        pending = self._pending if self._pending is not None and self._pending.rows else None
        kept = [s.record for s in self._segments]
        if not self._segments and pending is None:
            return [], False
        name = f"rerank.{generation}.{FILE_SUFFIX['rerank']}"
        merge = any(r is None for r in kept) or len(kept) + (pending is not None) > MAX_RERANK_SEGMENTS
        if not merge:
            if pending is None:
                return list(kept), False
            with open(pending.path, "rb") as f:
                size, digest = hash_open_file(f)
                os.fsync(f.fileno())
            try:  # a second name for the pending file: if the save fails, the rows are still pending
                os.link(pending.path, staging / name)
            except OSError:  # a file system without hard links
                shutil.copyfile(pending.path, staging / name)
            new = {"name": name, "start": pending.start, "rows": pending.rows, "bytes": size, "sha256": digest}
            return [*kept, new], False
        out = HashingFile(staging / name)
        rows = 0
        parts = [(s.start, s.array) for s in self._segments] + (
            [(pending.start, self._pending_array())] if pending else []
        )
        for start, array in parts:
            if start != rows:
                raise RuntimeError(f"re-rank rows are not contiguous ({start} after {rows})")
            for i in range(0, len(array), 65536):
                out.write(np.ascontiguousarray(array[i : i + 65536], dtype="<f4"))
            rows += len(array)
        return [{"name": name, "start": 0, "rows": rows, **out.close()}], True

    def _remap_segments(self, records: list[dict[str, Any]], merged: bool) -> None:
        segments = [] if merged else [s for s in self._segments if s.record in records]
        have = {s.record["name"] for s in segments if s.record is not None}
        for rec in records:
            if rec["name"] not in have:
                array = np.memmap(
                    self.root / rec["name"], dtype="<f4", mode="r", shape=(rec["rows"], self.manifest.dim)
                )
                segments.append(_Segment(rec["start"], rec["rows"], array, rec))
        self._segments = sorted(segments, key=lambda s: s.start)

    def _write_rerank(self, start: int, vectors: np.ndarray) -> None:
        if self._pending is None:
            end = self._segments[-1].start + self._segments[-1].rows if self._segments else 0
            if start != end:
                raise RuntimeError(f"re-rank rows must follow the saved ones ({start} after {end})")
            path = self._staging_dir() / "rerank.pending.f32"
            path.write_bytes(b"")
            self._pending = _Pending(start, 0, path)
        pending = self._pending
        if start != pending.start + pending.rows:
            raise RuntimeError(
                f"re-rank rows must be added in label order ({start} after {pending.start + pending.rows})"
            )
        with open(pending.path, "ab") as f:
            f.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        pending.rows += len(vectors)
        pending.array = None

    def _pending_array(self) -> np.ndarray:
        pending = self._pending
        assert pending is not None and pending.rows
        if pending.array is None:
            pending.array = np.memmap(pending.path, dtype="<f4", mode="r", shape=(pending.rows, self.manifest.dim))
        return pending.array

    def _rerank_rows(self, labels: np.ndarray) -> np.ndarray:
        """The full vectors ``(len(labels), dim)`` of ``labels``, from the saved segments and the
        rows added since."""
        parts = [(s.start, s.array) for s in self._segments]
        if self._pending is not None and self._pending.rows:
            parts.append((self._pending.start, self._pending_array()))
        out = np.empty((len(labels), self.manifest.dim), dtype=np.float32)
        found = np.zeros(len(labels), dtype=bool)
        for start, array in parts:
            sel = (labels >= start) & (labels < start + len(array))
            if sel.any():
                out[sel] = array[labels[sel] - start]
                found |= sel
        if not found.all():
            raise IndexFormatError(f"{self.root}: no re-rank vector for label {int(labels[~found][0])}")
        return out

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._label_of

    def ids(self) -> list[str]:
        """Indexed product ids in label (insertion) order."""
        return [self._id_of[label] for label in sorted(self._id_of)]

    @property
    def is_trained(self) -> bool:
        return bool(self.faiss.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train an ``ivfpq`` index on a sample ``(n, dim)``; a no-op for the other kinds."""
        if not self.faiss.is_trained:
            self.faiss.train(self._check(vectors, "training vectors"))

    def _check(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
            raise DataError(f"{what}: expected shape (n, {self.manifest.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise DataError(f"{what}: contains NaN or infinite values")
        return vectors

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[int, int]:
        """Add products (``vectors`` float32 ``(n, dim)``); an id already present is replaced.

        Returns ``(added, replaced)``.
        """
        ids = [str(x) for x in ids]
        vectors = self._check(vectors, "vectors")
        if len(ids) != vectors.shape[0]:
            raise ValueError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
        if len(set(ids)) != len(ids):
            dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
            raise DataError(f"duplicate product ids in one add: {', '.join(dup)}")
        if not self.faiss.is_trained:
            raise ConfigError(f"{self.root}: the {self.manifest.kind} index must be trained before adding vectors")
        replaced = [x for x in ids if x in self._label_of]
        if replaced:
            self.remove(replaced)
        start = self.manifest.next_label
        labels = np.arange(start, start + len(ids), dtype=np.int64)
        if len(ids):
            self.faiss.add_with_ids(vectors, labels)
            if self.rerank:
                self._write_rerank(start, vectors)
        for label, pid in zip(labels.tolist(), ids, strict=True):
            self._id_of[label] = pid
            self._label_of[pid] = label
        self.manifest.next_label = start + len(ids)
        self.manifest.count = len(self)
        return len(ids) - len(replaced), len(replaced)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove products by id (unknown ids are ignored); returns how many were removed.

        ``exact`` and ``ivfpq`` delete in place; ``hnsw`` graphs cannot delete, so the graph is
        rebuilt from the remaining (exactly stored) vectors.
        """
        labels = [self._label_of[str(x)] for x in dict.fromkeys(ids) if str(x) in self._label_of]
        if not labels:
            return 0
        if self.manifest.kind == "hnsw":
            drop = set(labels)
            keep = np.array([label for label in sorted(self._id_of) if label not in drop], dtype=np.int64)
            vectors = np.stack([self.faiss.reconstruct(int(x)) for x in keep]) if len(keep) else None
            fresh = new_faiss_index("hnsw", self.manifest.dim, self.manifest.params)
            if vectors is not None:
                fresh.add_with_ids(vectors, keep)
            self.faiss = fresh
        else:
            removed = self.faiss.remove_ids(np.array(labels, dtype=np.int64))
            if removed != len(labels):
                raise RuntimeError(f"FAISS removed {removed} of {len(labels)} vectors")
        for label in labels:
            del self._label_of[self._id_of.pop(label)]
        self.manifest.count = len(self)
        return len(labels)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search, then (``ivfpq`` with ``rerank``) the exact re-rank of ``rerank·k`` candidates."""
        if not self.rerank:
            return self.faiss.search(queries, k)
        candidates = min(len(self), k * self.rerank)
        _, labels = self.faiss.search(queries, candidates)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_labels = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (q, cand) in enumerate(zip(queries, labels, strict=True)):
            cand = cand[cand >= 0]
            exact = self._rerank_rows(cand) @ q
            order = np.lexsort((cand, -exact))[:k]  # best first; equal scores by label
            out_scores[row, : len(order)] = exact[order]
            out_labels[row, : len(order)] = cand[order]
        return out_scores, out_labels

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Neighbour]]:
        """The ``k`` best products of each query (``(q, dim)`` float32), best first."""
        queries = self._check(np.atleast_2d(queries), "queries")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if len(self) == 0:
            return [[] for _ in range(queries.shape[0])]
        scores, labels = self._search(queries, min(k, len(self)))
        return [
            [
                Neighbour(self._id_of[int(label)], float(score))
                for score, label in zip(srow, lrow, strict=True)
                if label >= 0
            ]
            for srow, lrow in zip(scores, labels, strict=True)
        ]

    def search_labels(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Raw FAISS labels ``(q, k)`` (-1 where fewer hits); for recall measurements."""
        return self._search(self._check(queries, "queries"), k)[1]
