"""How an index folder is written without losing anything: generation files, staging, one lock.

The design, in four rules (used by :meth:`moon.index.VectorIndex.save` and ``open``):

1. **A data file never changes once it is in the index folder.** Each save writes its files under
   names that carry its *generation* (``vectors.7.faiss``, ``ids.7.parquet``, ``rerank.7.f32``), a
   number one higher than any in the folder; ``manifest.json`` names the files of its generation
   with their size and sha256.
2. **The manifest is replaced last, with one** :func:`os.replace`. A save writes the new files into
   a hidden staging folder next to them (``INDEX/.moon-tmp-<pid>-<hex>/``, same file system), moves
   them into the folder under their new names (no file a reader uses is touched), then replaces
   ``manifest.json``: that rename is the moment readers switch from the whole old index to the
   whole new one. The old generation's files are deleted afterwards. A process killed anywhere
   (even ``kill -9``) leaves the old manifest with all of its files, plus files no manifest names,
   which the next save deletes (:func:`remove_leftovers`).
3. **Readers need no lock.** ``VectorIndex.open`` opens the files its manifest names right after
   reading it (an open file outlives its deletion), checks each one's size and sha256 while reading
   it, and — if one is gone or does not match *because the manifest changed meanwhile* — opens the
   index again. A file that does not belong to an unchanged manifest is an error, never used.
4. **Writers take the index's lock** (:func:`index_lock`: ``fcntl.flock`` on ``INDEX/.moon-index.lock``)
   for the whole read-modify-write, so concurrent ``moon index add/remove`` run one after the
   other and none is lost. A save also refuses an index that was opened from an older generation
   than the one on disk (:class:`IndexConflictError`), so two writers that did not lock cannot
   silently drop each other's changes.

Writing an index into a folder whose ``manifest.json`` is not an index's (a product store, or
anything else) is refused before anything is written (:func:`check_index_target`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from moon.data.safe_open import json_format
from moon.errors import ConfigError, MoonError
from moon.index.manifest import (
    FORMAT_NAME,
    GENERATION_FILE,
    LEGACY_FILES,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    IndexFormatError,
)

try:  # POSIX; elsewhere writers are still serialised within one process and checked by generation
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".moon-index.lock"
#: staging folders (the same prefix as the product store's): ``INDEX/.moon-tmp-<pid>-<hex>/``
STAGING_PREFIX = ".moon-tmp-"
_STAGING = re.compile(r"^\.moon-tmp-(\d+)-[0-9a-f]+$")
STORE_FORMAT = "moon-store"  # moon.data.store.FORMAT_NAME (not imported: moon.data is heavier)
CHUNK = 1 << 20


class IndexConflictError(MoonError):
    """The index on disk changed after this copy of it was opened; saving would lose that change."""


class IndexSaveError(MoonError):
    """An index could not be written (a full disk, no permission); the index on disk is unchanged."""


# ---------------------------------------------------------------------------------------- target
def manifest_format(path: Path) -> str | None:
    """The ``format`` a ``manifest.json`` names, ``"?"`` when it is not a readable JSON object,
    ``None`` when there is no such file; never raises, never blocks (a FIFO is refused)."""
    return json_format(path, MAX_MANIFEST_BYTES)


def check_index_target(root: str | os.PathLike) -> None:
    """Refuse (:class:`ConfigError`) to write an index into ``root`` when it is a file, or when its
    ``manifest.json`` is not an index's — a product store's, another tool's, or unreadable — even
    with ``--overwrite``: an index would replace that manifest. Nothing is written before."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: exists and is not a directory; an index is a folder")
    fmt = manifest_format(root / MANIFEST_FILE)
    if fmt is None or fmt == FORMAT_NAME:
        return
    if fmt == STORE_FORMAT:
        what = "a product store (its manifest.json says moon-store)"
    elif fmt == "?":
        what = "a manifest.json that is not a readable MOON index manifest"
    else:
        what = f"a {fmt!r} manifest.json"
    raise ConfigError(
        f"{root}: holds {what}; refusing to write an index there, even with --overwrite (it would replace that "
        "manifest): write the index to its own folder, e.g. --out STORE/index"
    )


# ---------------------------------------------------------------------------------------- lock
class _Held:
    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.fd: int | None = None
        self.depth = 0
        self.pid = os.getpid()


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def index_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of the index folder ``root`` (which must exist) while the block runs.

    ``fcntl.flock`` on ``root/.moon-index.lock`` (created once, never deleted) excludes other
    processes; a per-folder ``threading.RLock`` excludes other threads. Re-entrant in one thread,
    so ``build_index`` can hold it across the build and ``save`` take it again."""
    root = Path(root)
    if not root.is_dir():
        raise IndexFormatError(f"{root}: no such directory")
    key = os.path.realpath(root)
    with _held_guard:
        held = _held.get(key)
        if held is None or held.pid != os.getpid():  # a forked child does not hold its parent's lock
            held = _held[key] = _Held()
    with held.thread_lock:
        if held.depth == 0:
            fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            held.fd = fd
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                fd, held.fd = held.fd, None
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)


# ---------------------------------------------------------------------------------------- files
def new_staging(root: Path) -> Path:
    """A fresh hidden staging folder inside ``root`` (same file system: the final moves are renames)."""
    path = root / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


class HashingFile:
    """A binary file being written that counts its bytes and hashes them (sha256) on the way."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.file.write(view)
        self.size += len(view)
        return len(view)

    def close(self) -> dict[str, object]:
        """Flush to disk (fsync) and return ``{"bytes", "sha256"}``."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def write_file(path: Path, data: bytes) -> dict[str, object]:
    out = HashingFile(path)
    out.write(data)
    return out.close()


def hash_open_file(f, start: int = 0) -> tuple[int, str]:
    """``(bytes, sha256)`` of an open binary file from offset ``start`` to its end."""
    f.seek(start)
    sha, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(CHUNK), b""):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (best effort: some file systems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def highest_generation(root: Path) -> int:
    """The highest generation any data file in ``root`` carries (0 when none)."""
    best = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            m = GENERATION_FILE.match(entry.name)
            if m:
                best = max(best, int(m.group(2)))
    return best


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: someone else's live process
        return True
    return True


def remove_leftovers(root: Path, keep: set[str]) -> None:
    """Delete what no manifest uses any more: data files of other generations (and of the layout
    before generations) not in ``keep``, and staging folders of processes that are gone. Called
    with the lock held, after the new manifest is in place."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            name = entry.name
            if name in keep:
                continue
            if GENERATION_FILE.match(name) or name in LEGACY_FILES:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            m = _STAGING.match(name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)
