"""Which model and store an index names, recorded so that they load from any directory, read back safely.

At build time :func:`model_reference` turns the user's ``--model`` into manifest fields: a model
*directory* (``runs/small/final`` or ``dual-encoder:runs/de/final``) is stored as an absolute path
(``model``) and as a path relative to the index directory (``model_relative``), so the index works
from any working directory, and after the index and the model were moved together.

A manifest is a data file: whoever wrote it may not be the user running ``moon search``. So
:func:`manifest_model_spec` only ever returns specs that load weights without running code or
reaching a model hub:

* a preset name (``moon-tiny``, ``moon-small`` …) or a model built in code from installed assets
  (``random``, ``random:SEED``, ``dual-encoder``, ``pretrained-towers``, ``two-tower``,
  ``two-tower:PRESET``);
* a directory saved by ``save_pretrained`` of a family that saves plain weights (``moon``,
  ``dual-encoder``, ``pretrained-towers``, ``two-tower``: safetensors), or a transformers Qwen-VL
  directory (no remote code).

Which families are which is each family's own policy, stated once in :mod:`moon.models.registry`
and applied by :mod:`moon.models.trust`.

A directory is refused, before anything in it is loaded, when a transformers file in it or in a
folder inside it (``backbone/``, ``backbone/lm/``, ``processor/`` …) has an ``auto_map``: that key
names Python code for transformers to import (:func:`check_no_custom_code`), and transformers,
not told ``trust_remote_code``, would otherwise stop at its interactive "run the custom code?"
prompt (a hung ``moon serve``) or, answered yes, run it.

Anything else in a manifest (``py:`` specs, ``gme:`` and ``open-clip:`` checkpoints, hub ids, other
families) is refused with a :class:`~moon.errors.ConfigError` telling the user to pass ``--model``
themselves if they trust it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moon.data.safe_open import read_json
from moon.errors import ConfigError, DataError
from moon.index.manifest import IndexFormatError
from moon.models.saved import saved_family
from moon.models.trust import named_spec_is_safe, saved_dir_prefix, saved_family_is_safe

#: the transformers files whose ``auto_map`` makes an Auto class import the checkpoint's own code
CODE_MAP_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
#: how deep inside a model directory they are looked for (``backbone/lm/config.json`` is 2 deep)
CODE_MAP_DEPTH = 3
_CODE_MAP_MAX_DIRS = 256
_CODE_MAP_MAX_BYTES = 64 << 20


def model_reference(spec: str, index_dir: str | os.PathLike) -> dict[str, Any]:
    """Manifest fields for the model ``spec`` (as the user gave it): ``{"model", "model_relative"}``."""
    prefix, path = saved_dir_prefix(spec)
    p = Path(path)
    if not p.is_dir():
        return {"model": spec, "model_relative": None}
    absolute = p.resolve()
    relative = os.path.relpath(absolute, Path(index_dir).resolve())
    return {"model": prefix + str(absolute), "model_relative": prefix + relative}


def _refuse(spec: str, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: names the model {spec!r}, which MOON does not load on a data file's word (only presets and "
        "saved model directories are; a py:/gme:/open-clip: spec or a hub id could run code or reach a model hub). "
        f"If you trust it, pass --model {spec!r} yourself"
    )


def _custom_code_files(directory: Path) -> Iterator[Path]:
    """The :data:`CODE_MAP_FILES` in ``directory`` and in the folders inside it (at most
    :data:`CODE_MAP_DEPTH` deep, :data:`_CODE_MAP_MAX_DIRS` folders), folders in name order."""
    pending, seen = [(directory, 0)], 0
    while pending and seen < _CODE_MAP_MAX_DIRS:
        folder, depth = pending.pop(0)
        seen += 1
        for name in CODE_MAP_FILES:
            if (folder / name).exists() or (folder / name).is_symlink():
                yield folder / name
        if depth < CODE_MAP_DEPTH:
            try:
                subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:
                continue
            pending.extend((p, depth + 1) for p in subfolders)


def check_no_custom_code(directory: str | os.PathLike, where: str) -> None:
    """Refuse (:class:`ConfigError`, one line) a model directory named by a data file (``where``)
    when one of its transformers files has an ``auto_map`` (custom code), before anything loads it.
    The files are read with the bounded JSON reader; one that cannot be read is refused too."""
    directory = Path(directory)
    for path in _custom_code_files(directory):
        try:
            data = read_json(path, _CODE_MAP_MAX_BYTES)
        except DataError as exc:
            raise ConfigError(f"{where}: names the model directory {directory}, but {exc}") from exc
        if isinstance(data, dict) and "auto_map" in data:
            raise ConfigError(
                f"{where}: names the model directory {directory}, whose {path.relative_to(directory)} has an auto_map "
                "(custom code, which MOON does not run on a data file's word, nor ask about); if you trust that code, "
                f"load the model explicitly yourself: --model {str(directory)!r} with your own trust flag "
                "(--trust-remote-code)"
            )


def _directory_spec(prefix: str, directory: Path, spec: str, where: str) -> str:
    family = saved_family(str(directory))
    if prefix and family not in (None, prefix[:-1]):
        raise ConfigError(f"{where}: {directory} holds a {family!r} model, the manifest says {prefix[:-1]!r}")
    if not saved_family_is_safe(family):
        raise _refuse(spec, where)
    check_no_custom_code(directory, where)
    return prefix + str(directory)


def manifest_model_spec(manifest: Any, index_dir: str | os.PathLike) -> str:
    """The spec to load for an index whose user gave no ``--model`` (see the module docstring).

    Raises :class:`IndexFormatError` when the recorded model directory is gone, and
    :class:`ConfigError` for a spec that is not loaded from a data file.
    """
    root = Path(index_dir)
    where = f"{root / 'manifest.json'}"
    spec = str(manifest.model)
    prefix, path = saved_dir_prefix(spec)
    relative = getattr(manifest, "model_relative", None)
    legacy = int(getattr(manifest, "version", 1)) < 2  # before model_relative: paths were as typed
    candidates = []
    if Path(path).is_absolute():
        candidates.append(Path(path))
    if relative:
        candidates.append(root / saved_dir_prefix(str(relative))[1])
    if legacy and not Path(path).is_absolute():
        candidates += [root / path, Path(path)]  # next to the index, then (as before) the working directory
    for directory in candidates:
        if directory.is_dir():
            return _directory_spec(prefix, directory.resolve(), spec, where)
    if named_spec_is_safe(spec):
        return spec
    looks_like_path = os.sep in path or path.startswith(".")
    if prefix or Path(path).is_absolute() or relative or (legacy and looks_like_path):
        looked = ", ".join(str(c) for c in candidates)
        raise IndexFormatError(
            f"{root}: the model directory the index was built with is gone (looked in {looked}); "
            "pass --model DIR with the same model, or rebuild the index"
        )
    raise _refuse(spec, where)


def store_reference(store_root: str | os.PathLike, index_dir: str | os.PathLike) -> dict[str, str]:
    """Manifest fields for the product store: ``{"store": absolute, "store_relative": from the index}``."""
    absolute = Path(store_root).resolve()
    return {"store": str(absolute), "store_relative": os.path.relpath(absolute, Path(index_dir).resolve())}


def manifest_store_dir(manifest: Any, index_dir: str | os.PathLike) -> Path:
    """The store directory an index names: its absolute path, else the one relative to the index
    (both moved together), else — for manifests from before ``store_relative`` — the path as written.
    Returns the first candidate when none exists (the caller reports it)."""
    root = Path(index_dir)
    recorded = Path(str(manifest.store))
    relative = getattr(manifest, "store_relative", None)
    candidates = [recorded] if recorded.is_absolute() else []
    if relative:
        candidates.append(root / relative)
    if not recorded.is_absolute():
        candidates += [root / recorded, recorded]
    for c in candidates:
        if (c / "manifest.json").is_file():
            return c
    return candidates[0] if candidates else recorded
