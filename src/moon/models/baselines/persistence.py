"""Saving and loading the trainable baselines: ``embedder.json`` + ``model.safetensors`` (no pickle)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from typing import Any, TypeVar

import torch

from moon.errors import ConfigError
from moon.models.saved import WEIGHTS_FILE, read_saved, write_saved

__all__ = [
    "WEIGHTS_FILE",
    "SavedConfigModule",
    "config_with_overrides",
    "read_saved_config",
    "save_module",
    "tensors_fingerprint",
]
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
    """``embedder.json`` ({"family", "config"}) and the given tensors as safetensors
    (:func:`moon.models.saved.write_saved`)."""
    write_saved(directory, {"family": family, "config": asdict(config)}, state)


def read_saved_config(directory: str | os.PathLike, family: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The saved config dict and tensors of a ``family`` directory (:func:`moon.models.saved.read_saved`,
    with the config taken out of ``embedder.json``; clear errors when it is not one)."""
    meta, tensors = read_saved(directory, family)
    return meta.get("config") or {}, tensors


def tensors_fingerprint(config: Any, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the config JSON and the tensors' bytes (sorted by name)."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:32]


class SavedConfigModule:
    """Save and load for a baseline module whose whole state is its dataclass ``config`` and its
    ``state_dict()``: subclasses set ``family`` and ``config_class`` and take ``(config, *, name=)``."""

    family: str
    config_class: type

    def save_pretrained(self, directory: str) -> None:
        """Write ``embedder.json`` ({"family", "config"}) and ``model.safetensors``."""
        save_module(self, directory, self.family, self.config, self.state_dict())  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(cls, directory: str, **overrides: Any):
        config, tensors = read_saved_config(directory, cls.family)
        model = cls(config_with_overrides(cls.config_class, config, overrides), name=f"{cls.family}:{directory}")  # type: ignore[call-arg]
        model.load_state_dict(tensors)  # type: ignore[attr-defined]
        return model

    @classmethod
    def load(cls, arg: str | None = None, **overrides: Any):
        """``FAMILY`` (fresh, seeded) or ``FAMILY:DIR`` / ``DIR`` (saved by :meth:`save_pretrained`)."""
        if arg:
            return cls.from_pretrained(arg, **overrides)
        return cls(config_with_overrides(cls.config_class, None, overrides))  # type: ignore[call-arg]
