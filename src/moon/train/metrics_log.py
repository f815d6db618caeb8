"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (flushed per line) and writes scalars to TensorBoard.

    Only the main process logs (``enabled=False`` elsewhere).
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key.replace("@", "_at_"), value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
