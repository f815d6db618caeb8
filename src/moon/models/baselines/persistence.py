"""Saving and loading the trainable baselines: ``embedder.json`` + ``model.safetensors`` (no pickle)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from moon.errors import ConfigError
from moon.models import EMBEDDER_FILE, read_embedder_meta

WEIGHTS_FILE = "model.safetensors"
C = TypeVar("C")


def config_with_overrides(config_cls: type[C], base: dict[str, Any] | None, overrides: dict[str, Any]) -> C:
    """Build a dataclass config from a dict plus overrides; unknown keys are a :class:`ConfigError`."""
    names = {f.name for f in fields(config_cls)}  # type: ignore[arg-type]
    values = dict(base or {})
    values.update(overrides)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{config_cls.__name__}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return config_cls(**values)


def save_module(
    module: torch.nn.Module, directory: str | os.PathLike, family: str, config: Any, state: dict[str, torch.Tensor]
) -> None:
    """Write ``embedder.json`` ({"family", "config"}) and the given tensors as safetensors."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    meta = {"family": family, "config": asdict(config)}
    (out / EMBEDDER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_saved(directory: str | os.PathLike, family: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The saved config dict and tensors of a ``family`` directory (clear errors when it is not one)."""
    d = Path(directory)
    meta_path, weights = d / EMBEDDER_FILE, d / WEIGHTS_FILE
    if not meta_path.exists() or not weights.is_file():
        raise ConfigError(f"{d}: not a saved {family} model (needs {EMBEDDER_FILE} and {WEIGHTS_FILE})")
    meta = read_embedder_meta(d)  # bounded: a FIFO, huge, deep or non-JSON file is a one-line error
    if meta.get("family") != family:
        raise ConfigError(f"{meta_path}: family is {meta.get('family')!r}, expected {family!r}")
    return meta.get("config") or {}, load_file(str(weights))


def tensors_fingerprint(config: Any, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the config JSON and the tensors' bytes (sorted by name)."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:32]
