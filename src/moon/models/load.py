"""The one public loader: :func:`load_embedder`."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from moon.errors import ConfigError
from moon.models.protocol import TRAINABLE_METHODS, missing_trainable_methods
from moon.models.registry import get_family
from moon.models.spec import parse_spec


def _python_factory(spec: str, target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"model spec {spec!r}: cannot import {module_name}:{attr} ({exc})") from exc


def load_embedder(
    spec: str | os.PathLike,
    *,
    trainable: bool = False,
    overrides: Mapping[str, Any] | None = None,
    allow_python: bool = False,
    trust_remote_code: bool = False,
) -> Any:
    """The embedder named by ``spec`` (grammar: :mod:`moon.models.spec`).

    * ``overrides`` change fields of the family's config (``{"dim": 64, "seed": 1}``; for MOON, the
      fields of :class:`moon.model.MoonConfig`);
    * ``trainable=True`` returns a ``torch.nn.Module`` that ``moon train`` can train, or raises
      :class:`ConfigError` saying what it lacks;
    * ``allow_python=True`` accepts a ``py:module:factory`` spec, which imports and runs that code:
      pass it only for a spec from the user's own command line or config, never for one read from
      a data file (an index manifest, a run directory, a store);
    * ``trust_remote_code`` (set only from the user's ``--trust-remote-code``) reaches only the families whose
      checkpoints carry their own code (``gme``); every other family never runs checkpoint code.
    """
    parsed = parse_spec(spec)
    options = dict(overrides or {})
    if parsed.source == "python":
        if not allow_python:
            raise ConfigError(
                f"model spec {parsed.spec!r}: a py: spec runs Python code; it is accepted only from your own "
                "command line or training config, not from a data file"
            )
        model = _python_factory(parsed.spec, parsed.arg or "")(**options)
    else:
        family = get_family(parsed.family)
        if trainable and not family.trainable:
            raise ConfigError(f"model spec {parsed.spec!r}: the {family.name!r} family cannot be trained")
        if trust_remote_code and family.remote_code:
            options["trust_remote_code"] = True
        model = family.loader()(parsed.arg, **options)
    if trainable:
        missing = missing_trainable_methods(model)
        if missing:
            raise ConfigError(
                f"model spec {parsed.spec!r}: {type(model).__name__} is not trainable (needs a torch.nn.Module "
                f"with {', '.join(TRAINABLE_METHODS)}; missing {', '.join(missing)})"
            )
    return model
