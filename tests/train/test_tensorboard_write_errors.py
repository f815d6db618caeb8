"""Hardening round two: a TensorBoard folder that cannot be written does not stop training.

``metrics.jsonl`` is the record, TensorBoard a mirror: when ``RUN/tb`` cannot be written (a
read-only folder, a disk that fills up when TensorBoard's writer flushes) the run warns once, in
one line naming the folder and the cause, writes no more TensorBoard scalars and goes on; every
record is still in ``metrics.jsonl``. The faults are fed in through a fake ``SummaryWriter`` (so the
tests do not need tensorboard), and — where tensorboard is installed — through the real writer,
whose background thread meets the error.
"""

from __future__ import annotations

import errno
import sys
import types
import warnings
from pathlib import Path

import pytest
from helpers import toy_run_config

from moon.train import train
from moon.train.metrics_log import MetricsLogger, read_metrics

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class FakeWriter:
    """A ``SummaryWriter`` whose calls fail with ``ENOSPC`` from the ``fail_at``-th ``add_scalar``
    (``fail_at=0``: already when it is created; ``fail_at=None``: only at ``flush``)."""

    instances: list[FakeWriter] = []

    def __init__(self, log_dir: str, *, fail_at: int | None):
        self.log_dir, self.fail_at, self.scalars, self.closed = log_dir, fail_at, [], False
        FakeWriter.instances.append(self)
        if fail_at == 0:
            raise ENOSPC

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.fail_at is not None and len(self.scalars) + 1 >= self.fail_at:
            raise ENOSPC
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        if self.fail_at is None:
            raise ENOSPC

    def close(self) -> None:
        self.flush()
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    """``fake_tensorboard(fail_at)``: ``from torch.utils.tensorboard import SummaryWriter`` gives a :class:`FakeWriter`."""

    def install(fail_at: int | None) -> None:
        module = types.ModuleType("torch.utils.tensorboard")
        module.SummaryWriter = lambda log_dir: FakeWriter(log_dir, fail_at=fail_at)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
        FakeWriter.instances = []

    return install


def _tb_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "TensorBoard" in str(w.message)]


RECORDS = [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 5)]


@pytest.mark.parametrize("fail_at", [0, 3, None], ids=["when-created", "at-a-later-scalar", "when-flushed-at-close"])
def test_tensorboard_write_error_is_one_warning_and_metrics_are_kept(fail_at, fake_tensorboard, tmp_path):
    fake_tensorboard(fail_at)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MetricsLogger(tmp_path, tensorboard=True)
        for record in RECORDS:
            logger.log(record)
        logger.close()
    assert _tb_warnings(caught) == [
        f"TensorBoard logging is off for the rest of the run: could not write {tmp_path / 'tb'} "
        f"([Errno 28] No space left on device); {tmp_path / 'metrics.jsonl'} keeps every record"
    ]
    assert read_metrics(tmp_path) == RECORDS
    (writer,) = FakeWriter.instances
    assert writer.log_dir == str(tmp_path / "tb")
    if fail_at == 3:  # the first two scalars were written, none after the failure
        assert writer.scalars == [("loss", 1.0, 1), ("lr", 0.1, 1)]


def test_training_goes_on_when_tensorboard_cannot_be_written(fake_tensorboard, hardening_store, tmp_path):
    fake_tensorboard(5)
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(toy_run_config(hardening_store, run, tensorboard=True))
    assert len(_tb_warnings(caught)) == 1
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "final").is_dir()


def test_tensorboard_folder_that_is_a_file_is_one_warning(tmp_path):
    """The real SummaryWriter: ``RUN/tb`` cannot be made (a file is in the way)."""
    pytest.importorskip("tensorboard")
    (tmp_path / "tb").write_text("in the way")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MetricsLogger(tmp_path, tensorboard=True)
        logger.log(RECORDS[0])
        logger.close()
    (line,) = _tb_warnings(caught)
    assert line.startswith(f"TensorBoard logging is off for the rest of the run: could not write {tmp_path / 'tb'} (")
    assert read_metrics(tmp_path) == RECORDS[:1]


def test_disk_full_in_tensorboards_writer_thread_is_one_warning_not_a_traceback(tmp_path, monkeypatch, capfd):
    """The real SummaryWriter, whose background thread appends the events: the disk fills up after
    the file's first record. The thread's error surfaces at the next call, as one warning; no thread
    traceback is printed."""
    pytest.importorskip("tensorboard")
    from tensorboard.compat.tensorflow_stub.io import gfile

    def append(self, filename, file_content, binary_mode=False):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MetricsLogger(tmp_path, tensorboard=True)
        for record in RECORDS:
            logger.log(record)
        logger.close()
    (line,) = _tb_warnings(caught)
    assert f"could not write {tmp_path / 'tb'} ([Errno 28] No space left on device)" in line
    assert read_metrics(tmp_path) == RECORDS
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert Path(tmp_path / "tb").is_dir()
