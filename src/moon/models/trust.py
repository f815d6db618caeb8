"""Which specs a *data file* (an index manifest) may name: those that load weights without running
code or reaching a model hub. The user's own ``--model`` is not limited by this; a data file's is.

The policy is the families' flags (:mod:`moon.models.registry`), so a new family states its own
policy once and the index's reader follows it.
"""

from __future__ import annotations

import re

from moon.models.registry import DEFAULT_FAMILY, Family, get_family, is_family, preset_names


def _family(name: str) -> Family | None:
    return get_family(name) if is_family(name) else None


def saved_dir_prefix(spec: str) -> tuple[str, str]:
    """``"dual-encoder:DIR"`` → ``("dual-encoder:", "DIR")`` for a family whose saved directories load
    safely; anything else → ``("", spec)``."""
    name, sep, arg = spec.partition(":")
    family = _family(name)
    if sep and arg and family is not None and family.saved:
        return name + ":", arg
    return "", spec


def saved_family_is_safe(name: str | None) -> bool:
    """Whether a directory saved by family ``name`` (``None``: a directory without ``embedder.json``,
    read by the default family as a transformers checkpoint, without remote code) loads as plain
    weights."""
    family = _family(name or DEFAULT_FAMILY)
    return family is not None and family.saved


def named_spec_is_safe(spec: str) -> bool:
    """Whether a spec that names no directory builds its model in code from installed assets only:
    a preset, a ``fresh`` family's bare name, ``family:INT`` for a ``seed_arg`` family,
    ``family:PRESET`` for a ``preset_arg`` one."""
    if spec in preset_names():
        return True
    name, sep, arg = spec.partition(":")
    family = _family(name)
    if family is None:
        return False
    if not sep:
        return family.fresh
    if family.seed_arg and re.fullmatch(r"\d+", arg):
        return True
    return family.preset_arg and arg in preset_names()
