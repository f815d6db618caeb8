"""The one way MOON opens a file a user named: never hangs, never reads without a bound.

A path given by a user or a data file may name something that is not a file: a named pipe (FIFO)
blocks ``open()`` until a writer comes, ``/dev/zero`` never ends, a socket cannot be opened, a
directory is not data, and a sparse file can claim terabytes. :func:`open_regular` and
:func:`read_regular` refuse all of them with one line that names the path and the reason:

1. ``stat`` the path first and refuse anything that is not a regular file without opening it (opening
   some devices has side effects: a tape rewinds, a watchdog starts);
2. ``os.open`` with ``O_RDONLY | O_NONBLOCK`` (a FIFO swapped in meanwhile does not block the open);
3. ``fstat`` the opened descriptor — this is the check that counts, it cannot race with a rename —
   and refuse a non-regular file or one larger than ``max_bytes``;
4. clear ``O_NONBLOCK`` and read at most ``max_bytes + 1`` bytes, so a file that grows after the
   ``fstat`` (or one that reports size 0, like those in ``/proc``) is still refused, not read whole.

Errors are :class:`FileRefusedError` (a :class:`~moon.errors.DataError`, so the CLI prints
``error: <path>: <reason>``); callers with their own error type (``ImageLoadError``) re-raise its
``reason``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Any, BinaryIO

from moon.errors import DataError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no FIFOs to block on
    fcntl = None  # type: ignore[assignment]

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class FileRefusedError(DataError):
    """A path that cannot be read as a regular file: ``"<source>: <reason>"``."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"a named pipe (FIFO)"``, ``"a directory"`` …"""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def _refuse_mode(label: str, mode: int, what: str) -> FileRefusedError:
    return FileRefusedError(label, f"is {file_kind(mode)}, not {what}")


def _too_large(label: str, size: int | None, max_bytes: int, hint: str) -> FileRefusedError:
    if size is None:  # found while reading: the file grew, or its size is not what it claims
        return FileRefusedError(label, f"too large (more than the limit of {max_bytes:,} bytes{hint})")
    return FileRefusedError(label, f"too large ({size:,} bytes > limit {max_bytes:,} bytes{hint})")


def _os_error(label: str, exc: OSError, what: str, path: str | os.PathLike) -> FileRefusedError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FileRefusedError(label, "file not found")
    if exc.errno == errno.ENXIO:  # a socket (or a device without its driver): say which
        try:
            return _refuse_mode(label, os.stat(path).st_mode, what)
        except (OSError, ValueError):
            pass
    return FileRefusedError(label, f"cannot be read ({exc.strerror or exc})")


def check_regular(path: str | os.PathLike, *, what: str = "a file", label: str | None = None) -> os.stat_result:
    """``stat`` ``path`` (symlinks followed) and refuse it unless it is a regular file.

    For readers that must hand a *path* to a library (pyarrow); readers that read the bytes
    themselves use :func:`open_regular`, which also checks the opened descriptor.
    """
    label = label if label is not None else os.fspath(path)
    try:
        st = os.stat(path)
    except ValueError as exc:  # a NUL byte in the path
        raise FileRefusedError(label, f"unusable path ({exc})") from exc
    except OSError as exc:
        raise _os_error(label, exc, what, path) from exc
    if not stat.S_ISREG(st.st_mode):
        raise _refuse_mode(label, st.st_mode, what)
    return st


def open_regular(
    path: str | os.PathLike,
    max_bytes: int | None = None,
    *,
    what: str = "a file",
    label: str | None = None,
    hint: str = "",
) -> BinaryIO:
    """Open a regular file for binary reading, or raise :class:`FileRefusedError`.

    Args:
        path: the file (symlinks are followed; the file they lead to must be regular).
        max_bytes: refuse a file whose size is larger (``None``: no size check here).
        what: how the reason names what was expected (``"an image"`` → ``"is a directory, not an
            image"``).
        label: how to name the file in the message (defaults to the path).
        hint: appended to the "too large" reason (e.g. how to raise the limit).

    Returns:
        A blocking binary file object; the caller reads it with a bound (see :func:`read_regular`).
    """
    label = label if label is not None else os.fspath(path)
    check_regular(path, what=what, label=label)  # refuse devices before opening them
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except ValueError as exc:
        raise FileRefusedError(label, f"unusable path ({exc})") from exc
    except OSError as exc:
        raise _os_error(label, exc, what, path) from exc
    try:
        st = os.fstat(fd)  # the descriptor, not the path: what was opened is what is checked
        if not stat.S_ISREG(st.st_mode):
            raise _refuse_mode(label, st.st_mode, what)
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(label, st.st_size, max_bytes, hint)
        if fcntl is not None and getattr(os, "O_NONBLOCK", 0):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_at_most(stream: BinaryIO, n: int) -> bytes:
    """Read from ``stream`` until its end or until ``n`` bytes were read, in pieces of at most 1 MiB
    (a raw stream may return less than asked; a non-blocking one ``None``, taken as the end)."""
    pieces: list[bytes] = []
    got = 0
    while got < n:
        piece = stream.read(min(1 << 20, n - got))
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def read_regular(
    path: str | os.PathLike,
    max_bytes: int,
    *,
    what: str = "a file",
    label: str | None = None,
    hint: str = "",
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes, or :class:`FileRefusedError`.

    At most ``max_bytes + 1`` bytes are ever read, whatever the file claims its size is.
    """
    label = label if label is not None else os.fspath(path)
    with open_regular(path, max_bytes, what=what, label=label, hint=hint) as fh:
        try:
            data = read_at_most(fh, max_bytes + 1)
        except OSError as exc:
            raise FileRefusedError(label, f"cannot be read ({exc.strerror or exc})") from exc
    if len(data) > max_bytes:
        raise _too_large(label, None, max_bytes, hint)
    return data


# --- JSON ------------------------------------------------------------------------------------------

#: how deep a JSON document read from a file may nest (json.loads recurses once per level)
MAX_JSON_DEPTH = 128

# a JSON string (skipped whole, so brackets inside it do not count) or a bracket
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """Whether the brackets of the JSON text ``data`` nest deeper than ``limit`` (a scan in C-speed
    regex steps, before ``json.loads`` — which would recurse once per level — ever sees it)."""
    depth = 0
    for m in _JSON_TOKENS.finditer(data):
        c = data[m.start()]
        if c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def read_json(path: str | os.PathLike, max_bytes: int, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON document in the regular file ``path``: at most ``max_bytes`` read, at most
    ``max_depth`` levels parsed. Raises :class:`~moon.errors.DataError` (one line naming the file)
    for a file that is not regular (a FIFO never blocks), too large, nested too deeply, not UTF-8 or
    not JSON (``NaN`` / ``Infinity`` included)."""
    data = read_regular(path, max_bytes, what="a JSON file")
    if json_depth_exceeds(data, max_depth):
        raise DataError(f"{os.fspath(path)}: JSON nested too deeply (more than {max_depth} levels)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{os.fspath(path)}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from exc
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5,000-digit integer
        raise DataError(f"{os.fspath(path)}: not valid JSON ({_brief(exc)})") from exc


def json_format(path: str | os.PathLike, max_bytes: int) -> str | None:
    """The ``format`` field a JSON manifest names (``moon-store``, ``moon-index`` …): ``None`` when
    there is no such file, ``"?"`` when it is not a readable JSON object with a string ``format``;
    never raises, never blocks."""
    if not (os.path.exists(path) or os.path.islink(path)):
        return None
    try:
        data = read_json(path, max_bytes)
    except DataError:
        return "?"
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) else "?"
