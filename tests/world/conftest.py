"""One tiny world per test session, reused by every test of the world package."""

from __future__ import annotations

import pytest

from moon.world import WorldParams, synthesize

TINY_N = 48
TINY_SEED = 11
# more held-out leaves and cold products than the default, so a tiny world has some of each
TINY_PARAMS = WorldParams(held_out_leaf_fraction=0.3, cold_product_fraction=0.2, duplicate_rate=0.3)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "store"
    return synthesize(root, n_products=TINY_N, seed=TINY_SEED, show_progress=False, params=TINY_PARAMS, workers=1)
