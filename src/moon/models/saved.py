"""A saved model directory: ``embedder.json`` (its family and config) beside safetensors weights.

Every family's ``save_pretrained`` writes ``embedder.json`` with a ``"family"`` key, so that
:func:`moon.models.load_embedder` can load the directory without being told what it holds.
"""

from __future__ import annotations

import json
import os
from typing import Any

from moon.errors import ConfigError

EMBEDDER_FILE = "embedder.json"
#: the most bytes of ``embedder.json`` that are read (it holds a config, a few KB)
MAX_EMBEDDER_JSON_BYTES = 4 << 20


def has_embedder_file(path: str | os.PathLike) -> bool:
    """Whether ``path/embedder.json`` exists in any form (a FIFO or a dangling link too, so that
    :func:`read_embedder_meta` refuses it with one line instead of the path being taken for a hub id)."""
    return os.path.lexists(os.path.join(os.fspath(path), EMBEDDER_FILE))


def read_embedder_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in ``path/embedder.json``, read with the bounded reader: a file that is not a
    regular file (a FIFO never blocks), larger than :data:`MAX_EMBEDDER_JSON_BYTES`, nested too
    deeply, not UTF-8, not JSON or not a JSON object is a one-line :class:`ConfigError` naming it."""
    from moon.data.safe_open import read_json
    from moon.errors import DataError

    meta_path = os.path.join(os.fspath(path), EMBEDDER_FILE)
    try:
        meta = read_json(meta_path, MAX_EMBEDDER_JSON_BYTES)
    except DataError as exc:
        raise ConfigError(f"unreadable saved model: {exc}") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"unreadable saved model: {meta_path}: not a JSON object ({type(meta).__name__})")
    family = meta.get("family")
    if family is not None and not isinstance(family, str):
        raise ConfigError(f"unreadable saved model: {meta_path}: 'family' is a {type(family).__name__}, expected text")
    return meta


def saved_family(path: str | os.PathLike) -> str | None:
    """The family recorded in ``path/embedder.json`` by ``save_pretrained``, if there is one."""
    if not has_embedder_file(path):
        return None
    return read_embedder_meta(path).get("family")


#: the weights of a saved directory, next to ``embedder.json``
WEIGHTS_FILE = "model.safetensors"


def write_saved(directory: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    """The one saved format of every family: ``tensors`` as ``model.safetensors`` (on CPU, contiguous,
    no pickle) and ``meta`` (which names its ``"family"``, and holds the config) as ``embedder.json``.
    A family writes whatever else it needs (tokenizer, backbone config) beside them."""
    from safetensors.torch import save_file

    if not isinstance(meta.get("family"), str):
        raise ValueError("write_saved: meta must name its 'family'")
    out = os.fspath(directory)
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(state, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out, EMBEDDER_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")


def read_saved_meta(directory: str | os.PathLike, family: str) -> dict[str, Any]:
    """``embedder.json`` of a directory saved by ``family``; not a saved directory, another family's
    or a damaged file (bounded read) is a one-line :class:`ConfigError` naming it."""
    d = os.fspath(directory)
    if not has_embedder_file(d):
        raise ConfigError(f"{d}: not a saved {family} model (no {EMBEDDER_FILE})")
    meta = read_embedder_meta(d)
    if meta.get("family") != family:
        raise ConfigError(f"{os.path.join(d, EMBEDDER_FILE)}: family is {meta.get('family')!r}, expected {family!r}")
    return meta


def read_weights(directory: str | os.PathLike) -> dict[str, Any]:
    """The tensors of ``model.safetensors`` in ``directory`` (no pickle); missing or unreadable: a
    one-line :class:`ConfigError` naming the file."""
    from safetensors.torch import load_file

    d = os.fspath(directory)
    weights = os.path.join(d, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise ConfigError(f"{d}: {WEIGHTS_FILE} is missing")
    try:
        return load_file(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ConfigError(f"{weights}: not a readable safetensors file ({exc})") from exc


def read_saved(directory: str | os.PathLike, family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, tensors)`` of a directory saved by ``family`` (:func:`write_saved`):
    :func:`read_saved_meta` then :func:`read_weights`."""
    return read_saved_meta(directory, family), read_weights(directory)
