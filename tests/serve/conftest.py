"""Fixtures for the API tests: the toy embedder/store of ``tests/index/conftest.py`` and a built index."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "moon_tests_index_toys", Path(__file__).parents[1] / "index" / "conftest.py"
)
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)


@pytest.fixture(scope="session")
def served_index(tmp_path_factory):
    """``(index_dir, store, embedder)``: the 12-product toy store indexed exactly."""
    from moon.index import build_index

    root = tmp_path_factory.mktemp("served")
    store = toys.make_toy_store(root / "store")
    embedder = toys.ToyEmbedder()
    build_index(embedder, store, root / "index", model="toy")
    return root / "index", store, embedder


@pytest.fixture
def other_embedder():
    """Same family as the served index's model, different fingerprint."""
    return toys.ToyEmbedder(salt="other")


@pytest.fixture
def start_server():
    """``start(app, limits=None) -> uvicorn.Server``: serve ``app`` on a free loopback port with
    ``moon serve``'s uvicorn options (:func:`moon.serve.server.server_options`), in a thread;
    ``server.port`` is the port. Every server started is stopped after the test."""
    import threading
    import time

    import uvicorn

    from moon.serve import ServeLimits
    from moon.serve.server import server_options

    running = []

    def start(app, limits=None):
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            timeout_graceful_shutdown=5,
            **server_options(limits or ServeLimits()),
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        server.port = server.servers[0].sockets[0].getsockname()[1]
        return server

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=15)
