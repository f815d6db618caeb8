"""Training checkpoints: written atomically, checked when read, found again, pruned to the last K.

Layout (nothing is pickled: tensors in safetensors, everything else in JSON)::

    RUN/checkpoints/step-00000120/
        model.safetensors                   trainable parameters + buffers (frozen weights are rebuilt from the spec)
        trainer.json + trainer.safetensors  optimizer, scheduler, loss (temperature), memory queue, step, best metric
        rng-rank0.json (+ .safetensors)     Python / NumPy / torch (CPU, CUDA) RNG states of each rank
        checkpoint.json                     written last: format, step, the size and sha256 of every file above

A checkpoint is first written to ``step-XXXXXXXX.tmp`` and renamed when complete, so a process
killed mid-write leaves no directory that looks like a checkpoint. Before anything in it is used,
every file is checked against the size and sha256 that ``checkpoint.json`` records (checkpoints
written before the sha256s were recorded are checked by size only); JSON files are read only up to
a size and nesting depth; and with :func:`expected_states` every state is checked against the
objects it will be loaded into (keys, types, tensor shapes, finite values). A checkpoint that fails
any of this — a truncated or flipped byte, a crafted ``trainer.json``, a tensor of another shape —
fails :func:`read_checkpoint` with a one-line :class:`CheckpointError` naming the file and the
reason, and the trainer falls back to the previous one.

A checkpoint (or ``best/`` / ``final/``) that cannot be written — the disk is full (``ENOSPC``),
the quota is used up (``EDQUOT``), the folder is read-only — is a one-line
:class:`CheckpointWriteError` naming the folder, how much was being written and what to do; the
partly written ``.tmp`` folder is removed, and the checkpoints (and saved models) written before are
left as they were, so ``--resume`` continues from the newest of them.

Nested states (an optimizer's ``state_dict``) are stored as JSON with each tensor replaced by
``{"$tensor": "<key>"}`` (its key in the ``.safetensors`` file); tuples, dicts with non-string keys
and non-finite floats have their own ``$`` markers, so a state reads back equal to what was written.
Run directories from before this format (``model.pt`` / ``trainer.pt``, pickles) are refused, never
unpickled: see :func:`legacy_checkpoints`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moon.data.safe_open import MAX_JSON_DEPTH, read_json
from moon.errors import DataError, TrainingError

FORMAT = 1
MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})$")
_MARKERS = ("$tensor", "$tuple", "$dict", "$float", "$ndarray")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: the most bytes read from ``checkpoint.json`` and from a state's JSON file (tensors are in
#: safetensors, so a real one is a few kB to a few MB)
MAX_MANIFEST_BYTES = 1 << 20
MAX_STATE_JSON_BYTES = 64 << 20
#: the deepest JSON nesting read from a checkpoint (a real state nests about 6 levels)


class CheckpointError(DataError):
    """A checkpoint is incomplete, damaged or in a format MOON does not load."""


class CheckpointWriteError(TrainingError):
    """A checkpoint or saved model could not be written (a full disk, a used-up quota, a read-only
    folder); what was written before is kept, and the partly written folder removed."""


#: errnos that mean "no room left": a full file system, a used-up disk quota
DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _nbytes(obj: Any) -> int:
    """The bytes of the tensors and arrays in a (nested) state: about what a checkpoint writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} bytes"
    for unit, scale in (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)):
        if n < scale << 10 or unit == "GiB":
            return f"{n / scale:,.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _free(path: Path) -> str:
    """``"1.2 GiB free"`` on the file system of ``path`` (or of its nearest existing parent)."""
    for p in (path, *path.parents):
        try:
            return f"{_size(shutil.disk_usage(p).free)} free"
        except OSError:
            continue
    return "free space unknown"  # pragma: no cover


def _write_error(
    exc: OSError, what: str, where: Path, nbytes: int | None, kept: str, fewer: str = ""
) -> CheckpointWriteError:
    """The one-line error of a failed write of ``what`` into the folder ``where``."""
    about = f"about {_size(nbytes)} to write, " if nbytes else ""
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno and exc.strerror else _brief(exc)
    if exc.errno in DISK_FULL:
        full = "disk quota exceeded" if exc.errno == getattr(errno, "EDQUOT", None) else "disk full"
        return CheckpointWriteError(
            f"{full} while writing {what} to {where} ({about}{_free(where)}; {reason}); {kept}. "
            f"Free space on that disk{fewer}, then continue with --resume"
        )
    return CheckpointWriteError(
        f"could not write {what} to {where} ({about}{reason}); {kept}. Fix that, then continue with --resume"
    )


def _ckpt_write_error(
    exc: OSError, run_dir: str | os.PathLike, step: int, tmp: Path, nbytes: int | None, *, remove: bool = True
) -> CheckpointWriteError:
    """Remove the partly written ``tmp`` (unless not ``remove``) and describe the failed write of the
    checkpoint of ``step``."""
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    found = list_checkpoints(run_dir)
    kept = "the partly written checkpoint was removed; " + (
        f"the earlier checkpoints are intact (newest: {found[-1][1].name})" if found else "there is no earlier one"
    )
    fewer = ", or checkpoint less often (run.ckpt_every) or keep fewer (run.keep_last)"
    return _write_error(exc, f"checkpoint {checkpoint_dir(run_dir, step).name}", tmp.parent, nbytes, kept, fewer)


def _as_os_error(exc: Exception, path: Path) -> OSError | None:
    """The ``OSError`` inside a safetensors error (``… I/O error: No space left on device (os error 28)``)."""
    m = _OS_ERROR.search(str(exc))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


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


def _kept_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers (what training changes)."""
    keep = _kept_names(model)
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
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # (a number too large for its dtype)
        raise CheckpointError(f"{where}: malformed {marker} entry ({_brief(exc)!r})"[:300]) from exc


# --- files ---------------------------------------------------------------------------------------


def _brief(exc: BaseException) -> str:
    """An exception's message on one line, at most 200 characters (it goes into a one-line error)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file, read in 1 MiB pieces."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


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
    try:
        save_file(out, str(path))
    except SafetensorError as exc:  # safetensors reports a full disk as "I/O error: … (os error 28)"
        os_error = _as_os_error(exc, path)
        if os_error is None:
            raise
        raise os_error from exc
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


def read_json_file(path: Path, max_bytes: int, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON document in ``path``, read only up to ``max_bytes`` and ``max_depth`` levels.

    Raises :class:`CheckpointError` (one line, naming the file) for a file that is missing, too
    large, nested too deeply, not UTF-8 or not JSON (``NaN`` / ``Infinity`` included): the reasons
    of :func:`moon.data.safe_open.read_json`."""
    try:
        return read_json(path, max_bytes, max_depth=max_depth)
    except DataError as exc:
        raise CheckpointError(str(exc)) from exc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({_brief(exc)})") from exc


def _load_state(directory: Path, name: str, listed: set[str] | None = None) -> dict[str, Any]:
    """The state ``name`` (JSON + its tensors). Only files in ``listed`` (the manifest's) are read."""
    path = directory / f"{name}.json"
    encoded = read_json_file(path, MAX_STATE_JSON_BYTES)
    tensor_file = directory / f"{name}.safetensors"
    has_tensors = f"{name}.safetensors" in listed if listed is not None else tensor_file.exists()
    tensors = _load_tensors(tensor_file) if has_tensors else {}
    try:
        state = _decode(encoded, tensors, str(path))
    except RecursionError as exc:  # not reached: the depth was checked when reading
        raise CheckpointError(f"{path}: nested too deeply") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    return state


def begin_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """Create (fresh) the temporary directory of the checkpoint of ``step``."""
    tmp = checkpoint_dir(run_dir, step).with_suffix(".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise _ckpt_write_error(exc, run_dir, step, tmp, None) from exc
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    """Write this rank's RNG states into ``tmp``; a failed write is a one-line
    :class:`CheckpointWriteError` and removes ``tmp`` (the checkpoint is lost, none before it). On a
    rank other than 0 it removes only this rank's files: the other ranks may still be writing into
    ``tmp``, and rank 0 removes it once every rank has heard of the failure (``moon.train.loop``)."""
    state = rng_state()
    name = f"rng-rank{rank}"
    try:
        _save_state(state, tmp, name)
    except OSError as exc:
        m = _NAME.match(tmp.name.removesuffix(".tmp"))
        step = int(m.group(1)) if m else 0
        if rank != 0:
            for suffix in (".safetensors", ".json"):
                with contextlib.suppress(OSError):
                    (tmp / f"{name}{suffix}").unlink(missing_ok=True)
        raise _ckpt_write_error(exc, tmp.parent.parent, step, tmp, _nbytes(state), remove=rank == 0) from exc


def finish_checkpoint(
    run_dir: str | os.PathLike, step: int, tmp: Path, model: dict[str, Any], trainer: dict[str, Any], keep_last: int
) -> Path:
    """Write the model and trainer files and ``checkpoint.json`` (the size and sha256 of every other
    file, hashed from disk after each was written and fsynced) into ``tmp``, rename it into place,
    prune old ones.

    A write that fails (``OSError``: a full disk, a used-up quota, …) removes ``tmp`` and raises a
    one-line :class:`CheckpointWriteError`; the checkpoints written before are not touched (old ones
    are pruned only after the new one is in place)."""
    try:
        _save_tensors(model, tmp / "model.safetensors")
        _save_state(trainer, tmp, "trainer")
        files: dict[str, int] = {}
        hashes: dict[str, str] = {}
        for p in sorted(tmp.iterdir()):
            if p.name != MANIFEST:
                files[p.name], hashes[p.name] = _digest(p)
        _save_json({"format": FORMAT, "step": step, "files": files, "sha256": hashes}, tmp / MANIFEST)
        final = checkpoint_dir(run_dir, step)
        if final.exists():  # (only a damaged one: --resume continues from the newest readable checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        raise _ckpt_write_error(exc, run_dir, step, tmp, _nbytes(model) + _nbytes(trainer)) from exc
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint whose files are all present with the sizes and sha256s written.

    A manifest without ``sha256`` (written before MOON recorded them) is checked by size only.
    Raises :class:`CheckpointError` naming the first missing, truncated, changed or unexpected file.
    """
    manifest_file = path / MANIFEST
    manifest = read_json_file(manifest_file, MAX_MANIFEST_BYTES)
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"{manifest_file}: not a MOON checkpoint manifest of format {FORMAT}")
    step = manifest.get("step")
    m = _NAME.match(path.name)
    if not _is_int(step) or (m is not None and int(m.group(1)) != step):
        raise CheckpointError(f"{manifest_file}: step is {step!r}, but the checkpoint is {path.name}"[:300])
    files = manifest["files"]
    for name, size in files.items():
        if not name or Path(name).name != name or name.startswith(".") or name == MANIFEST or "\0" in name:
            raise CheckpointError(f"{manifest_file}: bad file name {name!r}"[:300])
        if not _is_int(size) or size < 0:
            raise CheckpointError(f"{manifest_file}: files.{name} must be a size in bytes, got {size!r}"[:300])
    for needed in ("model.safetensors", "trainer.json"):
        if needed not in files:
            raise CheckpointError(f"{manifest_file}: does not list {needed}")
    hashes = manifest.get("sha256")
    if hashes is not None:
        if not isinstance(hashes, dict) or set(hashes) != set(files):
            raise CheckpointError(f"{manifest_file}: sha256 must give a digest for each file that files lists")
        for name, digest in hashes.items():
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise CheckpointError(f"{manifest_file}: sha256.{name} must be 64 hex digits, got {digest!r}"[:300])
    for name, size in files.items():  # sizes first: cheap, and they find a truncated file
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (or not a regular file)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: truncated or changed ({f.stat().st_size:,} bytes, {size:,} written)")
    for name, want in (hashes or {}).items():
        f = path / name
        try:
            _, got = _digest(f)
        except OSError as exc:
            raise CheckpointError(f"{f}: unreadable ({_brief(exc)})") from exc
        if got != want:
            raise CheckpointError(
                f"{f}: changed since it was written (sha256 {got[:12]}…, checkpoint.json records {want[:12]}…): "
                "a flipped bit, a bad disk or an edited file"
            )
    return manifest


def _check_rng(state: dict[str, Any], where: Path) -> None:
    """Try each RNG state on a scratch generator: one that would not load is damage, found now."""
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise CheckpointError(f"{where}: no {key!r} state")
    try:
        random.Random().setstate(state["python"])
    except (TypeError, ValueError, OverflowError, IndexError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{where}: python: not a random.Random state ({_brief(exc)})") from exc
    try:
        np.random.RandomState().set_state(state["numpy"])
    except (TypeError, ValueError, OverflowError, IndexError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{where}: numpy: not a NumPy random state ({_brief(exc)})") from exc
    try:
        torch.Generator().set_state(state["torch"])
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: torch: not a torch random state ({_brief(exc)})") from exc
    cuda = state.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, list)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 for t in cuda)
    ):
        raise CheckpointError(f"{where}: cuda: not a list of CUDA random states")


def read_checkpoint(
    path: Path, rank: int, expect: Expected | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """``(model state, trainer state, this rank's RNG state or None)``.

    Every file is checked (size, sha256) before it is read, and only files ``checkpoint.json``
    lists are read. With ``expect`` (:func:`expected_states`) the states are also checked against
    the objects they will be loaded into. Raises :class:`CheckpointError` (one line, naming the
    file and the reason) when anything is missing, truncated, changed, unreadable or does not fit.
    """
    manifest = check_checkpoint(path)
    listed = set(manifest["files"])
    model = _load_tensors(path / "model.safetensors")
    trainer = _load_state(path, "trainer", listed)
    rng = None
    if f"rng-rank{rank}.json" in listed:
        rng = _load_state(path, f"rng-rank{rank}", listed)
        _check_rng(rng, path / f"rng-rank{rank}.json")
    if expect is not None:
        expect.check(model, trainer, path, manifest["step"])
    return model, trainer, rng


# --- what a checkpoint must hold to be resumed into these objects --------------------------------

#: the per-parameter state Adam/AdamW keep (``max_exp_avg_sq`` too with ``amsgrad``)
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
#: the ranges of settings in param groups and the scheduler (learning rates, decay, epsilon, betas):
#: never negative, and within float32 (the optimizer multiplies float32 tensors by them)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_RANGES = {
    "lr": (0.0, _FLOAT32_MAX),
    "initial_lr": (0.0, _FLOAT32_MAX),
    "weight_decay": (0.0, _FLOAT32_MAX),
    "eps": (0.0, _FLOAT32_MAX),
    "base_lrs": (0.0, _FLOAT32_MAX),
    "_last_lr": (0.0, _FLOAT32_MAX),
    "betas": (0.0, 1.0),  # [0, 1)
}


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')} tensor"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:59] + '…'}"


def _template(v: Any) -> Any:
    """A copy of a template value that holds no tensor data (only shape and kind)."""
    if isinstance(v, torch.Tensor):
        return _TensorSpec(tuple(v.shape), v.is_floating_point())
    if isinstance(v, dict):
        return {k: _template(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_template(x) for x in v)
    return v


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    floating: bool


class _Mismatch(Exception):
    """Raised inside the checks; becomes a CheckpointError naming the file."""


def _like(v: Any, want: Any, at: str) -> None:
    """``v`` has the structure and types of the template value ``want`` (numbers finite; lists of
    the same length; mappings with the same keys; tensors of the same shape and kind)."""
    if isinstance(want, _TensorSpec):
        if not isinstance(v, torch.Tensor):
            raise _Mismatch(f"{at} must be a tensor, got {_describe(v)}")
        if tuple(v.shape) != want.shape or v.is_floating_point() != want.floating:
            raise _Mismatch(f"{at} is {_describe(v)}, expected shape {want.shape}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise _Mismatch(f"{at} holds values that are not finite")
    elif want is None or isinstance(want, (bool, str)):
        if type(v) is not type(want):
            raise _Mismatch(f"{at} must be {type(want).__name__}, got {_describe(v)}")
    elif _is_int(want):
        if not _is_int(v):
            raise _Mismatch(f"{at} must be an integer, got {_describe(v)}")
    elif isinstance(want, float):
        if not _is_number(v):
            raise _Mismatch(f"{at} must be a finite number, got {_describe(v)}")
    elif isinstance(want, (list, tuple)):
        if not isinstance(v, (list, tuple)) or len(v) != len(want):
            raise _Mismatch(f"{at} must be a list of {len(want)}, got {_describe(v)}")
        for i, (x, w) in enumerate(zip(v, want, strict=True)):
            _like(x, w, f"{at}[{i}]")
    elif isinstance(want, dict):
        if not isinstance(v, dict):
            raise _Mismatch(f"{at} must be a mapping, got {_describe(v)}")
        if set(v) != set(want):
            raise _Mismatch(f"{at} must have the keys {sorted(want)}, got {sorted(map(str, v))}"[:300])
        for k, w in want.items():
            _like(v[k], w, f"{at}.{k}")
    elif type(v) is not type(want):
        raise _Mismatch(f"{at} must be {type(want).__name__}, got {_describe(v)}")
    name = at.rsplit(".", 1)[-1].split("[", 1)[0]
    if name in _RANGES:
        low, high = _RANGES[name]
        values = v if isinstance(v, (list, tuple)) else [v]
        if any(_is_number(x) and not (low <= x <= high and (name != "betas" or x < high)) for x in values):
            raise _Mismatch(f"{at} is out of range, got {_describe(v)}")


@dataclass(frozen=True)
class Expected:
    """What a trainer checkpoint must hold to be loaded into a given model, optimizer, scheduler,
    loss and memory queue (made by :func:`expected_states`; passed to :func:`read_checkpoint`)."""

    model: dict[str, _TensorSpec]
    trainable: frozenset[str]
    param_groups: tuple[dict[str, Any], ...]  # template groups, "params" replaced by their count
    param_shapes: tuple[tuple[int, ...], ...]  # in the optimizer's order
    adam: bool
    scheduler: dict[str, Any]
    scheduler_attrs: frozenset[str]  # the scheduler's attributes that are not state
    loss: dict[str, Any]
    queue: tuple[int, int]  # size, dim
    products: int | None  # the catalog's size (queue entries index it), None: not checked

    def check(self, model: dict[str, Any], trainer: dict[str, Any], path: Path, step: int) -> None:
        try:
            self._model(model)
        except _Mismatch as exc:
            raise CheckpointError(f"{path / 'model.safetensors'}: {exc}") from None
        try:
            self._trainer(trainer, step)
        except _Mismatch as exc:
            raise CheckpointError(f"{path / 'trainer.json'}: {exc}") from None

    def _model(self, state: dict[str, Any]) -> None:
        unexpected = [k for k in state if k not in self.model]
        if unexpected:
            raise _Mismatch(f"has weights the model lacks (different model config?): {unexpected[:3]}")
        missing = [k for k in self.model if k not in state]
        if missing:
            raise _Mismatch(f"lacks weights the model trains: {missing[:3]}")
        for k, spec in self.model.items():
            t = state[k]
            if tuple(t.shape) != spec.shape or t.is_floating_point() != spec.floating:
                raise _Mismatch(f"{k} is {_describe(t)}, the model's is {spec.shape}")
            if k in self.trainable and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _Mismatch(f"{k} holds values that are not finite")

    def _trainer(self, t: dict[str, Any], step: int) -> None:
        for key in ("optimizer", "scheduler", "loss", "queue"):
            if key not in t:
                raise _Mismatch(f"no {key!r} entry")
        if "step" in t and (not _is_int(t["step"]) or t["step"] != step):
            raise _Mismatch(f"step is {_describe(t['step'])}, but the checkpoint is of step {step}")
        if t.get("strategy", "ddp") not in ("ddp", "fsdp"):
            raise _Mismatch(f"strategy must be 'ddp' or 'fsdp', got {_describe(t['strategy'])}")
        if "best" in t:
            best = t["best"]
            if not ((isinstance(best, float) and best == -math.inf) or (_is_number(best) and 0 <= best <= 1)):
                raise _Mismatch(f"best must be a score in [0, 1] (or -inf), got {_describe(best)}")
        for key in ("config", "data_position"):
            if key in t and not isinstance(t[key], dict):
                raise _Mismatch(f"{key} must be a mapping, got {_describe(t[key])}")
        self._optimizer(t["optimizer"])
        self._scheduler(t["scheduler"], step)
        _like(t["loss"], self.loss, "loss")
        self._queue(t["queue"])

    def _optimizer(self, o: Any) -> None:
        if (
            not isinstance(o, dict)
            or not isinstance(o.get("state"), dict)
            or not isinstance(o.get("param_groups"), list)
        ):
            raise _Mismatch(
                f"optimizer must be a mapping with a state mapping and a param_groups list, got {_describe(o)}"
            )
        groups = o["param_groups"]
        if len(groups) != len(self.param_groups):
            raise _Mismatch(f"optimizer has {len(groups)} parameter groups, this run's has {len(self.param_groups)}")
        position: dict[Any, int] = {}
        amsgrad: dict[Any, bool] = {}
        for gi, (g, want) in enumerate(zip(groups, self.param_groups, strict=True)):
            at = f"optimizer.param_groups[{gi}]"
            if not isinstance(g, dict):
                raise _Mismatch(f"{at} must be a mapping, got {_describe(g)}")
            params = g.get("params")
            if not isinstance(params, list) or len(params) != want["params"]:
                raise _Mismatch(f"{at}.params must list {want['params']} parameters, got {_describe(params)}")
            for pid in params:
                if not (_is_int(pid) or isinstance(pid, str)) or pid in position:
                    raise _Mismatch(f"{at}.params: a bad or repeated parameter id {pid!r}"[:300])
                position[pid] = len(position)
                amsgrad[pid] = g.get("amsgrad") is True
            for key, w in want.items():
                if key == "params":
                    continue
                if key not in g:
                    if w is None or isinstance(w, bool):  # a flag torch fills in with its default
                        continue
                    raise _Mismatch(f"{at} has no {key!r}")
                if (w is None or isinstance(w, bool)) and g[key] is not w:
                    raise _Mismatch(f"{at}.{key} is {g[key]!r}, this run's optimizer has {w!r}"[:300])
                _like(g[key], w, f"{at}.{key}")
            for key in g.keys() - want.keys():
                if not (g[key] is None or isinstance(g[key], (bool, str)) or _is_number(g[key])):
                    raise _Mismatch(f"{at}.{key}: an unknown setting holding {_describe(g[key])}"[:300])
        for pid, entry in o["state"].items():
            at = f"optimizer.state[{pid!r}]"[:80]
            if pid not in position:
                raise _Mismatch(f"{at}: no parameter group lists this parameter")
            if not isinstance(entry, dict):
                raise _Mismatch(f"{at} must be a mapping, got {_describe(entry)}")
            shape = self.param_shapes[position[pid]]
            if self.adam and entry:
                needed = _ADAM_STATE + (("max_exp_avg_sq",) if amsgrad[pid] else ())
                missing = [k for k in needed if k not in entry]
                if missing:
                    raise _Mismatch(f"{at} has no {missing[0]!r}")
            for key, v in entry.items():
                where = f"{at}.{key}"
                if isinstance(v, torch.Tensor):
                    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise _Mismatch(f"{where} holds values that are not finite")
                    if not self.adam:
                        continue
                    if key == "step":
                        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex() or float(v) < 0:
                            raise _Mismatch(f"{where} must be one step count >= 0, got {_describe(v)}")
                    elif tuple(v.shape) != shape or not v.is_floating_point():
                        raise _Mismatch(f"{where} is {_describe(v)}, its parameter's shape is {shape}")
                elif self.adam:
                    raise _Mismatch(f"{where} must be a tensor, got {_describe(v)}")
                elif not _is_number(v):
                    raise _Mismatch(f"{where} must be a tensor or a number, got {_describe(v)}")

    def _scheduler(self, s: Any, step: int) -> None:
        if not isinstance(s, dict):
            raise _Mismatch(f"scheduler must be a mapping, got {_describe(s)}")
        for key, w in self.scheduler.items():
            if key not in s:
                if w is None or isinstance(w, bool):
                    continue
                raise _Mismatch(f"scheduler has no {key!r}")
            _like(s[key], w, f"scheduler.{key}")
        for key in s.keys() - self.scheduler.keys():  # load_state_dict sets each as an attribute
            if (
                not isinstance(key, str)
                or key in self.scheduler_attrs
                or not (s[key] is None or isinstance(s[key], bool))
            ):
                raise _Mismatch(f"scheduler.{key}: not a scheduler setting"[:300])
        if "last_epoch" in self.scheduler and s["last_epoch"] != step:
            raise _Mismatch(f"scheduler.last_epoch is {s['last_epoch']!r}, but the checkpoint is of step {step}")

    def _queue(self, q: Any) -> None:
        size, dim = self.queue
        if not isinstance(q, dict):
            raise _Mismatch(f"queue must be a mapping, got {_describe(q)}")
        for key in ("size", "dim", "vectors", "products", "steps", "ptr"):
            if key not in q:
                raise _Mismatch(f"queue has no {key!r}")
        if not _is_int(q["size"]) or not _is_int(q["dim"]) or q["size"] != size or q["dim"] != dim:
            raise _Mismatch(f"queue is {q['size']!r}×{q['dim']!r}, this run's is {size}×{dim}"[:300])
        if "max_age" in q and not _is_int(q["max_age"]):
            raise _Mismatch(f"queue.max_age must be an integer, got {_describe(q['max_age'])}")
        _like(q["vectors"], _TensorSpec((size, dim), True), "queue.vectors")
        for key in ("products", "steps"):
            v = q[key]
            if (
                not isinstance(v, torch.Tensor)
                or tuple(v.shape) != (size,)
                or v.is_floating_point()
                or v.is_complex()
                or v.dtype == torch.bool
            ):
                raise _Mismatch(f"queue.{key} must be a ({size},) integer tensor, got {_describe(v)}")
        if size and int(q["products"].min()) < -1:
            raise _Mismatch("queue.products holds a product index below -1")
        if size and self.products is not None and int(q["products"].max()) >= self.products:
            raise _Mismatch(
                f"queue.products holds product {int(q['products'].max())}, but the catalog has {self.products} products"
            )
        if not _is_int(q["ptr"]) or not 0 <= q["ptr"] < max(size, 1):
            raise _Mismatch(f"queue.ptr must be in [0, {max(size, 1)}), got {_describe(q['ptr'])}")


def expected_states(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss: torch.nn.Module,
    queue: Any,
    *,
    products: int | None = None,
) -> Expected:
    """What a checkpoint must hold to be loaded into these objects: the model's trainable weights
    and buffers (names, shapes, kinds), the optimizer's parameter groups and parameter shapes, the
    scheduler's, the loss's and the memory queue's states (its product indices below ``products``,
    the catalog's size, when given). Takes no collective (FSDP-safe)."""
    keep = _kept_names(model)
    model_spec = {
        k: _TensorSpec(tuple(v.shape), v.is_floating_point()) for k, v in model.state_dict().items() if k in keep
    }
    groups = []
    for g in optimizer.state_dict()["param_groups"]:
        groups.append({**{k: _template(v) for k, v in g.items() if k != "params"}, "params": len(g["params"])})
    shapes = tuple(tuple(p.shape) for g in optimizer.param_groups for p in g["params"])
    sched = scheduler.state_dict()
    return Expected(
        model=model_spec,
        trainable=frozenset(n for n, p in model.named_parameters() if p.requires_grad),
        param_groups=tuple(groups),
        param_shapes=shapes,
        adam=isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)),
        scheduler=_template(sched),
        scheduler_attrs=frozenset(k for k in vars(scheduler) if k not in sched),
        loss=_template(loss.state_dict()),
        queue=(int(queue.size), int(queue.dim)),
        products=products,
    )


def save_pretrained_atomic(model: Any, directory: str | os.PathLike) -> Path:
    """``model.save_pretrained`` into a temp directory, then swap it in for ``directory``.

    A write that fails (a full disk, …) removes the temp directory, leaves ``directory`` as it was
    and raises a one-line :class:`CheckpointWriteError`."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            model.save_pretrained(str(tmp))
        except SafetensorError as exc:
            os_error = _as_os_error(exc, tmp)
            if os_error is None:
                raise
            raise os_error from exc
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        params = getattr(model, "parameters", None)
        nbytes = sum(p.numel() * p.element_size() for p in params()) if callable(params) else None
        kept = f"{final} was left as it was" + ("" if final.exists() else " (there was none)")
        raise _write_error(exc, f"the model {final.name}/", final.parent, nbytes, kept) from exc
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final
