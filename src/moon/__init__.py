"""MOON: generative-MLLM product embeddings for e-commerce (arXiv 2508.11999).

The public face::

    import moon
    emb = moon.load_embedder("moon-tiny")          # a preset, a saved directory or a hub id
    vecs = emb.encode_products(store.products())   # float32 (n, dim), L2-normalised

Heavy submodules (torch, transformers) are imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["MoonEmbedder", "load_embedder", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "MoonEmbedder":
        from moon.model import MoonEmbedder

        return MoonEmbedder
    if name == "load_embedder":
        from moon.models import load_embedder

        return load_embedder
    raise AttributeError(f"module 'moon' has no attribute {name!r}")
