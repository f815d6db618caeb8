"""A saved model directory: ``embedder.json`` (its family and config) beside safetensors weights.

Every family's ``save_pretrained`` writes ``embedder.json`` with a ``"family"`` key, so that
:func:`moon.models.load_embedder` can load the directory without being told what it holds.
"""

from __future__ import annotations

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
