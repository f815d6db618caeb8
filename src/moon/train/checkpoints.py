"""Training checkpoints: written atomically, found again, pruned to the last K.

Layout::

    RUN/checkpoints/step-00000120/
        model.pt       trainable parameters + buffers (frozen weights are rebuilt from the spec)
        trainer.pt     optimizer, scheduler, loss (temperature), memory queue, step, best metric
        rng-rank0.pt   Python / NumPy / torch (CPU, CUDA) RNG states of each rank

A checkpoint is first written to ``step-XXXXXXXX.tmp`` and renamed when complete, so a process
killed mid-write leaves no directory that looks like a checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "trainer.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers (what training changes)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keep}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    unexpected = [k for k in state if k not in model.state_dict()]
    if unexpected:
        raise ValueError(f"checkpoint has weights the model lacks (different model config?): {unexpected[:3]}")
    model.load_state_dict(state, strict=False)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def begin_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """Create (fresh) the temporary directory of the checkpoint of ``step``."""
    tmp = checkpoint_dir(run_dir, step).with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    _save(rng_state(), tmp / f"rng-rank{rank}.pt")


def finish_checkpoint(
    run_dir: str | os.PathLike, step: int, tmp: Path, model: dict[str, Any], trainer: dict[str, Any], keep_last: int
) -> Path:
    """Write the model and trainer files into ``tmp``, rename it into place, prune old ones."""
    _save(model, tmp / "model.pt")
    _save(trainer, tmp / "trainer.pt")
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """``(model state, trainer state, this rank's RNG state or None)``."""
    model = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    return model, trainer, rng


def save_pretrained_atomic(model: Any, directory: str | os.PathLike) -> Path:
    """``model.save_pretrained`` into a temp directory, then swap it in for ``directory``."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final
