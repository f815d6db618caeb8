"""The one grammar of a model spec, the string users pass as ``--model`` or ``model.spec``.

=============================== ============================================================ ==========
spec                            meaning                                                      ``source``
=============================== ============================================================ ==========
``py:package.module:factory``   ``factory(**overrides)``: your own Python code               python
``DIR`` with ``embedder.json``  a directory saved by ``save_pretrained``; the family is the  saved
                                one it records
``family`` / ``family:ARG``     a registered family (``random:3``, ``two-tower:moon-smol``,  named
                                ``dual-encoder:DIR`` …)
anything else                   the default family (MOON): a preset (``moon-tiny``), a       default
                                transformers directory or a hub id
=============================== ============================================================ ==========
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from moon.models.registry import DEFAULT_FAMILY, is_family
from moon.models.saved import saved_family

Source = Literal["python", "saved", "named", "default"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: the ``family`` that loads it and the ``arg`` handed to its loader (``None`` for
    a bare family name); for ``source == "python"``, ``arg`` is ``module:factory`` and ``family`` is
    ``"py"``."""

    spec: str
    family: str
    arg: str | None
    source: Source


def parse_spec(spec: str | os.PathLike) -> ModelSpec:
    """Parse ``spec`` (see the module docstring). A saved directory is recognised by its
    ``embedder.json``, which is read with the bounded reader (a damaged one is a one-line
    :class:`~moon.errors.ConfigError`)."""
    spec = os.fspath(spec)
    if spec.startswith("py:"):
        return ModelSpec(spec, "py", spec[3:], "python")
    if os.path.isdir(spec):
        family = saved_family(spec)
        if family is not None:
            return ModelSpec(spec, family, spec, "saved")
    name, sep, arg = spec.partition(":")
    if is_family(name):
        return ModelSpec(spec, name, arg if sep and arg else None, "named")
    return ModelSpec(spec, DEFAULT_FAMILY, spec, "default")
