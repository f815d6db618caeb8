"""Training checkpoints: written atomically, checked when read, found again, pruned to the last K.

Layout (nothing is pickled: tensors in safetensors, everything else in JSON)::

    RUN/checkpoints/step-00000120/
        model.safetensors                   trainable parameters + buffers (frozen weights are rebuilt from the spec)
        trainer.json + trainer.safetensors  optimizer, scheduler, loss (temperature), memory queue, step, best metric
        rng-rank0.json (+ .safetensors)     Python / NumPy / torch (CPU, CUDA) RNG states of each rank
        checkpoint.json                     written last: format, step and the size of every file above

A checkpoint is first written to ``step-XXXXXXXX.tmp`` and renamed when complete, so a process
killed mid-write leaves no directory that looks like a checkpoint; a checkpoint damaged later (a
truncated file, a full disk) fails :func:`read_checkpoint` with a :class:`CheckpointError`, and the
trainer falls back to the previous one.

Nested states (an optimizer's ``state_dict``) are stored as JSON with each tensor replaced by
``{"$tensor": "<key>"}`` (its key in the ``.safetensors`` file); tuples, dicts with non-string keys
and non-finite floats have their own ``$`` markers, so a state reads back equal to what was written.
Run directories from before this format (``model.pt`` / ``trainer.pt``, pickles) are refused, never
unpickled: see :func:`legacy_checkpoints`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moon.errors import DataError

FORMAT = 1
MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})$")
_MARKERS = ("$tensor", "$tuple", "$dict", "$float", "$ndarray")


class CheckpointError(DataError):
    """A checkpoint is incomplete, damaged or in a format MOON does not load."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoints that were completely written (they have ``checkpoint.json``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def legacy_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in the old pickled format (``trainer.pt``, no ``checkpoint.json``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if _NAME.match(p.name) and (p / "trainer.pt").exists() and not (p / MANIFEST).exists()
    )


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
        raise CheckpointError(f"checkpoint has weights the model lacks (different model config?): {unexpected[:3]}")
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


# --- nested state ⇄ (JSON, tensors) ------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        for k in obj:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"checkpoint state: cannot store a dict key of type {type(k).__name__}")
        return {"$dict": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    marker = next((m for m in _MARKERS if m in obj), None)
    if marker is None:
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    value = obj[marker]
    try:
        if marker == "$tensor":
            return tensors[value]
        if marker == "$tuple":
            return tuple(_decode(v, tensors, where) for v in value)
        if marker == "$dict":
            return {k: _decode(v, tensors, where) for k, v in value}
        if marker == "$float":
            if value not in ("inf", "-inf", "nan"):
                raise ValueError(value)
            return float(value)
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"dtype {dtype} is not numeric")
        return np.asarray(value, dtype=dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: malformed {marker} entry ({exc!r})") from exc


# --- files ---------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory or are not contiguous: copy those."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    save_file(out, str(path))
    _fsync(path)


def _save_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _save_state(state: dict[str, Any], directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    if tensors:
        _save_tensors(tensors, directory / f"{name}.safetensors")
    _save_json(encoded, directory / f"{name}.json")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc


def _load_state(directory: Path, name: str) -> dict[str, Any]:
    path = directory / f"{name}.json"
    try:
        encoded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    tensor_file = directory / f"{name}.safetensors"
    tensors = _load_tensors(tensor_file) if tensor_file.exists() else {}
    state = _decode(encoded, tensors, str(path))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    return state


def begin_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """Create (fresh) the temporary directory of the checkpoint of ``step``."""
    tmp = checkpoint_dir(run_dir, step).with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    _save_state(rng_state(), tmp, f"rng-rank{rank}")


def finish_checkpoint(
    run_dir: str | os.PathLike, step: int, tmp: Path, model: dict[str, Any], trainer: dict[str, Any], keep_last: int
) -> Path:
    """Write the model and trainer files and ``checkpoint.json`` into ``tmp``, rename it into place,
    prune old ones."""
    _save_tensors(model, tmp / "model.safetensors")
    _save_state(trainer, tmp, "trainer")
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
    _save_json({"format": FORMAT, "step": step, "files": files}, tmp / MANIFEST)
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose files are all present with the sizes written.

    Raises :class:`CheckpointError` naming the first missing, truncated or unexpected file.
    """
    manifest_file = path / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest_file}: unreadable ({exc})") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"{manifest_file}: not a MOON checkpoint manifest of format {FORMAT}")
    for name, size in manifest["files"].items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{manifest_file}: bad file name {name!r}")
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: truncated or changed ({f.stat().st_size:,} bytes, {size:,} written)")
    return manifest


def read_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """``(model state, trainer state, this rank's RNG state or None)``.

    Raises :class:`CheckpointError` when a file is missing, truncated or unreadable.
    """
    manifest = check_checkpoint(path)
    model = _load_tensors(path / "model.safetensors")
    trainer = _load_state(path, "trainer")
    rng = _load_state(path, f"rng-rank{rank}") if f"rng-rank{rank}.json" in manifest["files"] else None
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
