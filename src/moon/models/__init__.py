"""Every model MOON can load, train, index and serve, behind one loader.

::

    import moon
    emb = moon.load_embedder("moon-tiny")                       # a preset
    emb = moon.load_embedder("runs/small/final")                # a saved directory, any family
    emb = moon.load_embedder("two-tower:moon-smol", trainable=True, overrides={"seed": 1})

* :mod:`moon.models.spec`: the one grammar of a spec string;
* :mod:`moon.models.registry`: the families (``moon``, ``random``, ``dual-encoder``,
  ``pretrained-towers``, ``two-tower``, ``open-clip``, ``gme``) with their loaders and policy;
* :mod:`moon.models.trust`: which specs a data file may name;
* :mod:`moon.models.protocol`: what an embedder (and a trainable one) provides;
* :mod:`moon.models.saved`: the one saved format (``embedder.json`` + ``model.safetensors``).
"""

from __future__ import annotations

from moon.models.load import load_embedder
from moon.models.protocol import TRAINABLE_METHODS, Embedder, TrainableEmbedder, missing_trainable_methods
from moon.models.registry import (
    DEFAULT_FAMILY,
    Family,
    families,
    get_family,
    is_family,
    preset_names,
    register_family,
    unregister_family,
)
from moon.models.saved import (
    EMBEDDER_FILE,
    MAX_EMBEDDER_JSON_BYTES,
    WEIGHTS_FILE,
    has_embedder_file,
    read_embedder_meta,
    read_saved,
    saved_family,
    write_saved,
)
from moon.models.spec import ModelSpec, parse_spec

__all__ = [
    "DEFAULT_FAMILY",
    "EMBEDDER_FILE",
    "MAX_EMBEDDER_JSON_BYTES",
    "TRAINABLE_METHODS",
    "Embedder",
    "Family",
    "ModelSpec",
    "TrainableEmbedder",
    "WEIGHTS_FILE",
    "families",
    "get_family",
    "has_embedder_file",
    "is_family",
    "load_embedder",
    "missing_trainable_methods",
    "parse_spec",
    "preset_names",
    "read_embedder_meta",
    "read_saved",
    "register_family",
    "saved_family",
    "unregister_family",
    "write_saved",
]
