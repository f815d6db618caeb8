import pytest
from bench_helpers import build_store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A 16-product hand-written store (see bench_helpers.build_store)."""
    return build_store(tmp_path_factory.mktemp("bench") / "store")
