"""HTTP serving of an index: JSON API (search, embed, products, health, metrics) and a search page.

``create_app(index_dir, embedder=None, limits=ServeLimits())`` returns a FastAPI app;
``moon serve INDEX_DIR`` runs it with uvicorn and the protocol of :mod:`moon.serve.server`
(read deadline, connection limit, strict request framing).
"""

from __future__ import annotations

from typing import Any

from moon.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]


def __getattr__(name: str) -> Any:
    # the app (FastAPI, faiss) is imported when first used: `moon serve --help` and code that only
    # needs ServeLimits do not pay for it
    if name == "create_app":
        from moon.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'moon.serve' has no attribute {name!r}")
