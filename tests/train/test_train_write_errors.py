"""Hardening round two, "nothing lost": a disk that fills up while ``metrics.jsonl`` or ``best.json``
is written (the checkpoints' own case is ``test_checkpoint_disk_full.py``).

The fault is fed in at the lowest write of each file — the metrics logger's write of one line, the
``write_text`` of ``best.json``'s temporary file, of ``metrics.jsonl``'s rewrite on ``--resume`` —
after leaving part of the bytes on disk, as a real full disk does. ``moon train`` must stop with one
``error: …`` line that names the file, says the disk is full (or the quota exceeded), names the
newest intact checkpoint and says to continue with ``--resume``; no torn line or temporary file is
left, and ``--resume`` then ends where a run that never failed ends.
"""

from __future__ import annotations

import errno
import shutil
import warnings
from pathlib import Path

import pytest
from helpers import toy_run_config  # the hardening tests' 6-step toy run

from moon.train import checkpoints as ckpt
from moon.train import train
from moon.train.metrics_log import METRICS_FILE, MetricsLogger, read_metrics, write_text_atomic

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EDQUOT = OSError(errno.EDQUOT, "Disk quota exceeded")
EIO = OSError(errno.EIO, "Input/output error")


def _metrics_fault(monkeypatch, step: int, exc: OSError) -> None:
    """The write of step ``step``'s line writes 10 bytes, then fails."""
    real = MetricsLogger._write

    def write(self, data: bytes) -> None:
        if data.startswith(f'{{"step": {step},'.encode()):
            real(self, data[:10])
            raise exc
        real(self, data)

    monkeypatch.setattr(MetricsLogger, "_write", write)


def _write_text_fault(monkeypatch, name: str, exc: OSError) -> None:
    """``Path.write_text`` of a file called ``name`` writes part of the text, then fails."""
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == name:
            real(self, data[:5], *args, **kwargs)
            raise exc
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _cli(one_line_cli_error, config_file: Path, *extra: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return one_line_cli_error(["train", "--config", str(config_file), *extra])


def _same_end(run: Path, done: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn or unreadable metrics line was left behind
        got = read_metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    expected = {r["step"]: r["loss"] for r in read_metrics(done)}
    assert {r["step"]: r["loss"] for r in got} == pytest.approx(expected, rel=1e-5)
    assert (run / "final").is_dir() and (run / "best.json").read_text() == (done / "best.json").read_text()


@pytest.mark.parametrize(
    ("exc", "words"),
    [(ENOSPC, "disk full while writing"), (EDQUOT, "disk quota exceeded while writing"), (EIO, "could not write")],
    ids=["enospc", "edquot", "eio"],
)
def test_metrics_write_failure_is_one_line_and_resume_continues(
    exc, words, hardening_store, hardening_run, tmp_path, monkeypatch, one_line_cli_error
):
    run = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(toy_run_config(hardening_store, run).to_yaml())
    _metrics_fault(monkeypatch, 4, exc)

    line = _cli(one_line_cli_error, config_file)

    metrics = run / METRICS_FILE
    assert line.startswith(f"error: {words} {metrics} (the record of step 4; ")
    assert f"[Errno {exc.errno}] {exc.strerror}" in line, line
    assert "the checkpoints written so far are intact (newest: step-00000002). " in line
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        assert " free; " in line and line.endswith("Free space on that disk, then continue with --resume"), line
    else:
        assert line.endswith("Fix that, then continue with --resume"), line
    # the torn step-4 line was cut off: the file holds whole lines only
    assert metrics.read_bytes().endswith(b"\n")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert not (run / "final").exists()

    monkeypatch.undo()  # the disk has room again
    train(toy_run_config(hardening_store, run), resume=True)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]
    _same_end(run, hardening_run)


def test_best_json_write_failure_is_one_line_and_resume_continues(
    hardening_store, hardening_run, tmp_path, monkeypatch, one_line_cli_error
):
    """The toy run's best score is at step 2; checkpointing every step, step 1's is the newest kept."""
    run = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(toy_run_config(hardening_store, run, ckpt_every=1).to_yaml())
    _write_text_fault(monkeypatch, "best.json.tmp", ENOSPC)

    line = _cli(one_line_cli_error, config_file)

    assert line.startswith(f"error: disk full while writing {run / 'best.json'} (the best validation score, step 2; ")
    assert "No space left on device" in line and " free; " in line, line
    assert "the checkpoints written so far are intact (newest: step-00000001). " in line
    assert line.endswith("Free space on that disk, then continue with --resume"), line
    assert not (run / "best.json").exists() and not (run / "best.json.tmp").exists()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1]

    monkeypatch.undo()
    train(toy_run_config(hardening_store, run), resume=True)
    _same_end(run, hardening_run)


def test_best_json_failure_before_any_checkpoint_says_resume_starts_again(
    hardening_store, hardening_run, tmp_path, monkeypatch, one_line_cli_error
):
    run = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(toy_run_config(hardening_store, run).to_yaml())
    _write_text_fault(monkeypatch, "best.json.tmp", EDQUOT)
    line = _cli(one_line_cli_error, config_file)
    assert line.startswith(f"error: disk quota exceeded while writing {run / 'best.json'} (the best validation")
    assert "no checkpoint had been written yet (--resume starts the run again)" in line, line

    monkeypatch.undo()
    train(toy_run_config(hardening_store, run), resume=True)
    _same_end(run, hardening_run)


def test_metrics_rewrite_on_resume_failing_keeps_the_file(
    hardening_store, hardening_run, tmp_path, monkeypatch, one_line_cli_error
):
    """``--resume`` rewrites ``metrics.jsonl`` (dropping what the lost run logged later): a full disk
    there is one line too, and the file is left as it was."""
    run = tmp_path / "run"
    shutil.copytree(hardening_run, run)
    before = (run / METRICS_FILE).read_bytes()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(toy_run_config(hardening_store, run, steps=8).to_yaml())
    _write_text_fault(monkeypatch, f"{METRICS_FILE}.tmp", ENOSPC)

    line = _cli(one_line_cli_error, config_file, "--resume")

    assert line.startswith(f"error: disk full while writing {run / METRICS_FILE} (before step 7; "), line
    assert "(newest: step-00000006)" in line and line.endswith("then continue with --resume"), line
    assert (run / METRICS_FILE).read_bytes() == before
    assert not (run / f"{METRICS_FILE}.tmp").exists()


def test_write_text_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "best.json"
    target.write_text('{"step": 2}\n')
    _write_text_fault(monkeypatch, "best.json.tmp", ENOSPC)
    with pytest.raises(OSError) as info:
        write_text_atomic(target, '{"step": 4}\n')
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == '{"step": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]
