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
