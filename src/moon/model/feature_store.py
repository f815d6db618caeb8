"""An on-disk store of frozen-encoder image features, shared by processes and runs.

``$MOON_FEATURE_CACHE`` names a directory (unset or empty: no disk store). Under it::

    <root>/<vision_key>/<key[:2]>/<key>.npy

one float32 ``(k, D)`` ``.npy`` per image, where ``vision_key`` hashes the encoder's weights, input
size, grid and precision (:meth:`moon.model.graft.FrozenImageFeatures.key`) and ``key`` is the sha256 of the
image file's *bytes* (:func:`content_key`), so a copy of an image in another directory is a hit too.
Both keys must be lowercase hex, so nothing from outside can lead a path out of the root.

Writes are atomic (a unique temp file in the same directory, fsync, ``os.replace``): a reader never
sees a partial file and two processes writing one key both succeed, the last one winning with the
same bytes. A store that cannot be written (read-only, disk full) warns once and stops writing; the
caller computes the features anyway. A damaged entry (not a ``.npy``, a pickle, wrong dtype or shape,
non-finite values, too large, not a regular file) is never trusted: :meth:`FeatureStore.get` warns
with one line naming the file and why, removes it so it is recomputed, and reports a miss. Entries
are read with :func:`~moon.data.safe_open.read_regular` (bounded, never blocks) and parsed without
pickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moon.data.images import max_image_bytes
from moon.data.safe_open import open_regular, read_at_most, read_regular
from moon.errors import DataError

__all__ = ["ENV", "FeatureStore", "content_key", "default_root", "from_env"]

ENV = "MOON_FEATURE_CACHE"

_VISION_KEY = re.compile(r"[0-9a-f]{8,64}")
_CONTENT_KEY = re.compile(r"[0-9a-f]{64}")
_HEADER_SLACK = 4096  # an .npy header is 128 bytes or so; anything far beyond the data is not ours


def content_key(path: str | os.PathLike) -> str | None:
    """The sha256 (hex) of a regular file's bytes, or ``None`` when it cannot be read (missing, a
    directory, a FIFO — refused before opening, never blocks — or larger than the image size limit)."""
    limit = max_image_bytes()
    try:
        with open_regular(path, limit, what="an image") as fh:
            h = hashlib.sha256()
            got = 0
            while piece := read_at_most(fh, 1 << 20):
                got += len(piece)
                if got > limit:  # grew after the size check
                    return None
                h.update(piece)
    except (DataError, OSError, ValueError):
        return None
    return h.hexdigest()


def _check_key(key: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(key, str) or not pattern.fullmatch(key):
        raise ValueError(f"{what} must be {pattern.pattern} (lowercase hex), got {key!r}")
    return key


class FeatureStore:
    """The ``(k, D)`` float32 features of one encoder (``vision_key``), by image content key."""

    content_key = staticmethod(content_key)

    def __init__(self, root: str | os.PathLike, vision_key: str, shape: tuple[int, int]) -> None:
        _check_key(vision_key, _VISION_KEY, "vision key")
        if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"shape must be two positive ints (k, D), got {shape!r}")
        self.root = Path(root)
        self.directory = self.root / vision_key
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.max_bytes = self.shape[0] * self.shape[1] * 4 + _HEADER_SLACK
        self._write_failed = False

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lives (``ValueError`` unless it is 64 lowercase hex chars)."""
        _check_key(key, _CONTENT_KEY, "content key")
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored features of ``key`` (a fresh float32 tensor), or ``None``: missing or damaged."""
        path = self.path(key)
        try:
            st = os.lstat(path)
        except OSError:
            return None  # a miss (or an unreadable directory: the same to the caller)
        try:
            data = read_regular(path, self.max_bytes, what="a feature file")
            arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)  # never unpickles
        except DataError as exc:
            return self._damaged(path, st, getattr(exc, "reason", str(exc)))
        except Exception as exc:  # noqa: BLE001 - whatever a damaged .npy makes numpy raise
            return self._damaged(path, st, f"not a valid .npy ({' '.join(str(exc).split()) or type(exc).__name__})")
        if arr.dtype != np.float32:
            return self._damaged(path, st, f"dtype {arr.dtype}, expected float32")
        if arr.shape != self.shape:
            return self._damaged(path, st, f"shape {arr.shape}, expected {self.shape}")
        if not np.isfinite(arr).all():
            return self._damaged(path, st, "non-finite values")
        return torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))

    def _damaged(self, path: Path, st: os.stat_result, reason: str) -> None:
        try:  # an empty directory is removed, never a tree; anything else (file, link, FIFO) unlinked
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
            done = "removed"
        except OSError as exc:
            done = f"not removed ({exc.strerror or exc})"
        warnings.warn(f"feature cache: {path}: {reason}; ignored, {done}", RuntimeWarning, stacklevel=3)
        return None

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store ``features`` (``(k, D)`` matching ``shape``, finite) under ``key``, atomically.

        Raises ``ValueError`` for a bad key or features; never ``OSError``: a store that cannot be
        written warns once and is not written again by this instance.
        """
        path = self.path(key)
        if not isinstance(features, torch.Tensor) or tuple(features.shape) != self.shape:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a tensor of shape {self.shape}, got {got}")
        arr = np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())
        if not np.isfinite(arr).all():
            raise ValueError("features contain non-finite values; not stored")
        if self._write_failed:
            return
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                if hasattr(os, "fchmod"):
                    os.fchmod(fh.fileno(), 0o644)  # mkstemp's 0600 would hide a shared cache
                np.lib.format.write_array(fh, arr, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            self._write_failed = True
            warnings.warn(
                f"feature cache: cannot write under {self.directory} ({exc.strerror or exc}); "
                "the disk cache is off for this process",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def from_env(vision_key: str, shape: tuple[int, int]) -> FeatureStore | None:
    """A :class:`FeatureStore` under ``$MOON_FEATURE_CACHE``, or ``None`` when it is unset or empty."""
    root = os.environ.get(ENV, "")
    return FeatureStore(root, vision_key, shape) if root.strip() else None


@contextlib.contextmanager
def default_root(root: str | os.PathLike) -> Iterator[Path | None]:
    """Within the block, ``$MOON_FEATURE_CACHE`` is ``root`` unless the user set it (an empty
    value: the user turned the disk store off). Yields the directory in use, or ``None``; restores
    the environment afterwards. The demo and the ablation keep their features under their output
    directory this way, so a resumed or repeated run reads them instead of recomputing."""
    before = os.environ.get(ENV)
    if before is None:
        os.environ[ENV] = str(root)
    try:
        current = os.environ.get(ENV, "")
        yield Path(current) if current.strip() else None
    finally:
        if before is None:
            os.environ.pop(ENV, None)
