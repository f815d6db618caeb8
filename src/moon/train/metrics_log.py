"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard.

A write into the run directory that fails (``metrics.jsonl``, ``best.json``, ``config.yaml``: a full
disk, a used-up quota, a read-only folder) is a one-line :class:`RunFileWriteError` built by
:func:`run_file_write_error`, in the words of the checkpoint writer's errors: the file, the disk is
full / the quota exceeded, what was kept and to continue with ``--resume``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moon.errors import TrainingError

METRICS_FILE = "metrics.jsonl"

#: errnos that mean "no room left": a full file system, a used-up disk quota
DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


class RunFileWriteError(TrainingError):
    """A file of the run directory (``metrics.jsonl``, ``best.json`` …) could not be written; the
    checkpoints written before are intact and ``--resume`` continues from the newest."""


def _free(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if free >= scale:
                return f"{free / scale:,.1f} {unit} free"
        return f"{free:,} bytes free"
    return "free space unknown"


def run_file_write_error(exc: OSError, path: str | os.PathLike, *, during: str, kept: str) -> RunFileWriteError:
    """The one-line error of a failed write of ``path`` (``during``: e.g. ``"the record of step 4"``;
    ``kept``: what is intact, e.g. the newest checkpoint)."""
    path = Path(path)
    if exc.errno and exc.strerror:
        reason = f"[Errno {exc.errno}] {exc.strerror}"
    else:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    if exc.errno in DISK_FULL:
        full = "disk quota exceeded" if exc.errno == getattr(errno, "EDQUOT", None) else "disk full"
        return RunFileWriteError(
            f"{full} while writing {path} ({during}; {_free(path.parent)}; {reason}); {kept}. "
            "Free space on that disk, then continue with --resume"
        )
    return RunFileWriteError(
        f"could not write {path} ({during}; {reason}); {kept}. Fix that, then continue with --resume"
    )


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: a failed write (an
    ``OSError``, re-raised) leaves the old file as it was and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


#: a metrics line longer than this is not a record MOON wrote: it is skipped (read in pieces, never whole)
MAX_LINE_BYTES = 1 << 20


def _lines(path: Path) -> Iterator[tuple[int, bytes | None, bool]]:
    """``(line number, bytes or None when over MAX_LINE_BYTES, ends with a newline)`` of a file."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # drop the rest of the line in pieces
                    raw = f.readline(MAX_LINE_BYTES)
                yield number, None, bool(raw)
                continue
            yield number, raw, raw.endswith(b"\n")


def _record(raw: bytes) -> dict[str, Any] | str:
    """The JSON object on a line, or why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    try:
        record = json.loads(text)
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as exc:  # JSONDecodeError, a 5,000-digit integer
        return f"not JSON ({' '.join(str(exc).split())[:100]})"
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    return record


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``.

    A torn last line from a crash is skipped silently; any other line that is not a JSON object
    (not UTF-8, not JSON, nested too deeply, over 1 MiB) is skipped with one warning that counts
    them and names the first — never a traceback.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for number, raw, complete in _lines(path):
        if raw is None:
            skipped.append(f"line {number}: longer than {MAX_LINE_BYTES:,} bytes")
            continue
        if not raw.strip():
            continue
        got = _record(raw)
        if isinstance(got, dict):
            out.append(got)
        elif complete:  # an unterminated last line is what a killed run leaves: not worth a warning
            skipped.append(f"line {number}: {got}")
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} unreadable line{'s' if len(skipped) > 1 else ''} ({skipped[0]})",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (resuming drops what the lost run logged later,
    unreadable lines — see :func:`read_metrics` — and records whose step is not an integer)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept, bad = [], 0
    for r in read_metrics(run_dir):
        step = r.get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool):
            bad += 1
        elif step <= last_step:
            kept.append(r)
    if bad:
        warnings.warn(f"{path}: dropped {bad} record(s) whose step is not an integer", RuntimeWarning, stacklevel=2)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))  # an OSError: the old file is kept


TB_DIR = "tb"


def _quiet_tensorboard_thread_errors() -> None:
    """Keep the ``OSError`` of TensorBoard's background writer thread (a full disk, a read-only
    folder) from being printed as a thread traceback: the writer raises the same error again at its
    next call in the training process, where :class:`MetricsLogger` turns it into one warning line.
    Any other thread's exception, or any other exception, goes to the hook that was there before."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "_moon_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook._moon_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _reason(exc: OSError) -> str:
    if exc.errno and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return " ".join(str(exc).split())[:200] or type(exc).__name__


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (each line written straight to the file, unbuffered) and
    writes scalars to TensorBoard.

    Only the main process logs (``enabled=False`` elsewhere). A failed write (``OSError``: a full
    disk …) cuts the file back to its last whole line, closes it and is re-raised by :meth:`log`.

    TensorBoard is a mirror, ``metrics.jsonl`` the record: a TensorBoard folder that cannot be written
    (read-only, a full disk when its writer flushes) is one ``RuntimeWarning`` line naming the folder
    and the cause, and TensorBoard logging is off for the rest of the run; the run goes on.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb_dir = Path(run_dir) / TB_DIR
        self._file = None
        self._tb = None
        self._size = 0
        if not enabled:
            return
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._size = os.fstat(self._file.fileno()).st_size  # the end of the last whole line
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                return
            _quiet_tensorboard_thread_errors()
            try:
                self._tb = SummaryWriter(str(self.tb_dir))
            except OSError as exc:
                self._tensorboard_off(exc)

    def _tensorboard_off(self, exc: OSError) -> None:
        """Warn (once: the writer is dropped) and write no more TensorBoard scalars."""
        tb, self._tb = self._tb, None
        warnings.warn(
            f"TensorBoard logging is off for the rest of the run: could not write {self.tb_dir} ({_reason(exc)}); "
            f"{self.path} keeps every record",
            RuntimeWarning,
            stacklevel=3,
        )
        if tb is not None:
            with contextlib.suppress(OSError):  # (it may fail the same way again)
                tb.close()

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` to the (unbuffered) file; an ``OSError`` may leave part of it written."""
        assert self._file is not None
        view = memoryview(data)
        while view:
            n = self._file.write(view)
            if not n:  # a regular file never takes nothing; never loop on it
                raise OSError(errno.EIO, "the write took no bytes", str(self.path))
            view = view[n:]

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        line = (json.dumps(record) + "\n").encode("utf-8")
        try:
            self._write(line)
        except OSError:
            with contextlib.suppress(OSError):  # no torn line left behind (shrinking needs no space)
                os.ftruncate(self._file.fileno(), self._size)
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            raise
        self._size += len(line)
        if self._tb is not None:
            step = int(record["step"])
            try:  # (a failure of the writer's background thread surfaces at its next call)
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._tb.add_scalar(key.replace("@", "_at_"), value, step)
            except OSError as exc:
                self._tensorboard_off(exc)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # nothing is buffered: every line was written already
                self._file.close()
            self._file = None
        if self._tb is not None:
            try:
                self._tb.flush()  # (raises what the background thread met; close would not)
                self._tb.close()
                self._tb = None
            except OSError as exc:
                self._tensorboard_off(exc)
