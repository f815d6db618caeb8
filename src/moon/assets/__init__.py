"""Real pretrained weights that install offline from package registries, in one place.

No model hub is reachable where MOON is built and tested, but some registry packages carry real
weights (see ``docs/model.md#assets``). This package knows each of them: which pinned packages to
install, how to find the files **without importing** those packages, how to verify them, and how to
turn a GGUF language model into a plain safetensors directory that transformers loads quickly.

``moon assets list | install | verify`` is the command-line face; in code::

    from moon.assets import lm_dir, require
    path = lm_dir("smollm2-135m")   # converted once into the user cache, then reused

A missing asset raises :class:`AssetMissingError`, whose message names the command that installs it.
"""

from moon.assets.registry import (
    ASSETS,
    Asset,
    AssetMissingError,
    asset,
    asset_status,
    cache_root,
    efficientnet_lite0,
    install,
    lm_dir,
    require,
    verify,
)

__all__ = [
    "ASSETS",
    "Asset",
    "AssetMissingError",
    "asset",
    "asset_status",
    "cache_root",
    "efficientnet_lite0",
    "install",
    "lm_dir",
    "require",
    "verify",
]
