"""HTTP serving of an index: JSON API (search, embed, products, health, metrics) and a search page.

``create_app(index_dir, embedder=None, limits=ServeLimits())`` returns a FastAPI app;
``moon serve INDEX_DIR`` runs it with uvicorn and the protocol of :mod:`moon.serve.server`
(read deadline, connection limit, strict request framing).
"""

from moon.serve.app import create_app
from moon.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]
