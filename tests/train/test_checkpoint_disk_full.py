"""Hardening round two, "nothing lost": a disk that fills up while a checkpoint is written.

The fault itself is fed in: the lowest-level writes of the checkpoint writer — safetensors'
``save_file`` (which reports a full disk as ``SafetensorError: … I/O error: No space left on device
(os error 28)``, not as an ``OSError``) and the JSON file writes — fail with ``ENOSPC`` / ``EDQUOT``
while the step-4 checkpoint of a 6-step toy run is written, after leaving part of the file on disk
as a real full disk does. ``moon train`` must stop with one ``error: …`` line that says the disk is
full, names the checkpoint folder, how much was being written and what to do; the half-written
``step-00000004.tmp`` must be gone, the step-2 checkpoint intact, and ``--resume`` must continue
from it to the same end as a run that never failed.
"""

from __future__ import annotations

import errno
import shutil
import warnings
from pathlib import Path

import pytest
from helpers import toy_run_config  # the hardening tests' 6-step toy run
from safetensors import SafetensorError

from moon.train import checkpoints as ckpt
from moon.train import train
from moon.train.metrics_log import read_metrics

ENOSPC_TEXT = "No space left on device"


def _partial_then(path: Path, exc: BaseException) -> None:
    """What a full disk does: part of the file is written, then the write fails."""
    path.write_bytes(b"\0" * 100)
    raise exc


def _safetensors_fault(monkeypatch, target: str, exc: BaseException) -> None:
    real = ckpt.save_file

    def save_file(tensors, filename, *args, **kwargs):
        path = Path(filename)
        if path.parent.name == "step-00000004.tmp" and path.name == target:
            _partial_then(path, exc)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def _json_fault(monkeypatch, target: str, exc: BaseException) -> None:
    real = ckpt._save_json

    def save_json(obj, path):
        if path.parent.name == "step-00000004.tmp" and path.name == target:
            _partial_then(path, exc)
        return real(obj, path)

    monkeypatch.setattr(ckpt, "_save_json", save_json)


SAFETENSORS_ENOSPC = SafetensorError(f"Error while serializing: I/O error: {ENOSPC_TEXT} (os error 28)")
FAULTS = {
    # (where the write fails, what it raises, the words of the error line)
    "model-safetensors-error": (_safetensors_fault, "model.safetensors", SAFETENSORS_ENOSPC, "disk full"),
    "model-oserror": (_safetensors_fault, "model.safetensors", OSError(errno.ENOSPC, ENOSPC_TEXT), "disk full"),
    "trainer-quota": (
        _safetensors_fault,
        "trainer.safetensors",
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        "disk quota exceeded",
    ),
    "rng-state": (_safetensors_fault, "rng-rank0.safetensors", SAFETENSORS_ENOSPC, "disk full"),
    "trainer-json": (_json_fault, "trainer.json", OSError(errno.ENOSPC, ENOSPC_TEXT), "disk full"),
    "manifest-written-last": (_json_fault, "checkpoint.json", OSError(errno.ENOSPC, ENOSPC_TEXT), "disk full"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_disk_full_while_checkpointing_is_one_line_and_loses_nothing(
    fault, hardening_store, hardening_run, tmp_path, monkeypatch, one_line_cli_error
):
    inject, target, exc, words = FAULTS[fault]
    run = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(toy_run_config(hardening_store, run).to_yaml())
    inject(monkeypatch, target, exc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        line = one_line_cli_error(["train", "--config", str(config_file)])

    root = run / "checkpoints"
    assert line.startswith(f"error: {words} while writing checkpoint step-00000004 to {root} (about "), line
    assert " free; " in line and ("Disk quota exceeded" if "quota" in words else ENOSPC_TEXT) in line, line
    assert "the partly written checkpoint was removed" in line, line
    assert "the earlier checkpoints are intact (newest: step-00000002)" in line, line
    assert "Free space on that disk, or checkpoint less often (run.ckpt_every) or keep fewer (run.keep_last)" in line
    assert line.endswith("then continue with --resume"), line
    # nothing half-written under a checkpoint's name, no temporary folder left; step 2 verifies
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    ckpt.check_checkpoint(root / "step-00000002")
    ckpt.read_checkpoint(root / "step-00000002", 0)

    monkeypatch.undo()  # the disk has room again: --resume continues from step 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(toy_run_config(hardening_store, run), resume=True)
    assert not [w for w in caught if "damaged checkpoint" in str(w.message)]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    # ... to the same end as the run that never failed
    done = {r["step"]: r["loss"] for r in read_metrics(hardening_run)}
    assert {r["step"]: r["loss"] for r in read_metrics(run)} == pytest.approx(done, rel=1e-5)
    assert (run / "final").is_dir()


def test_disk_full_while_saving_final_keeps_the_checkpoints_and_resume_writes_it(
    hardening_store, hardening_run, tmp_path, monkeypatch, one_line_cli_error
):
    """``final/`` (``save_pretrained_atomic``): the model's own safetensors write fails."""
    import safetensors.torch

    run = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(toy_run_config(hardening_store, run).to_yaml())
    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        path = Path(filename)
        if path.parent.name == "final.tmp":
            _partial_then(path, SAFETENSORS_ENOSPC)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        line = one_line_cli_error(["train", "--config", str(config_file)])
    assert line.startswith(f"error: disk full while writing the model final/ to {run} (about "), line
    assert f"{run / 'final'} was left as it was (there was none)" in line, line
    assert line.endswith("Free space on that disk, then continue with --resume"), line
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]

    monkeypatch.undo()
    train(toy_run_config(hardening_store, run), resume=True)
    assert (run / "final" / "toy.safetensors").is_file()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]


def test_a_failed_best_save_leaves_the_previous_best_as_it_was(tmp_path):
    """``save_pretrained_atomic`` over an existing folder: the old one is kept byte for byte."""

    class Full:
        def save_pretrained(self, directory: str) -> None:
            Path(directory).mkdir()
            _partial_then(Path(directory) / "weights.bin", OSError(errno.ENOSPC, ENOSPC_TEXT))

    best = tmp_path / "best"
    best.mkdir()
    (best / "weights.bin").write_bytes(b"old weights")
    with pytest.raises(ckpt.CheckpointWriteError, match=r"^disk full while writing the model best/ to ") as info:
        ckpt.save_pretrained_atomic(Full(), best)
    assert "\n" not in str(info.value) and f"{best} was left as it was. Free space" in str(info.value)
    assert (best / "weights.bin").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    shutil.rmtree(best)
