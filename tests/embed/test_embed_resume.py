"""Resuming `moon embed`: only missing or damaged shards are encoded again, never twice."""

from __future__ import annotations

import numpy as np
import pytest

from moon.data import ProductStore
from moon.embed import VectorShards, embed_store, read_manifest
from moon.errors import ConfigError


def _ids_and_vectors(out):
    ids, parts = [], []
    for shard_ids, vectors in VectorShards.open(out):
        ids.extend(shard_ids)
        parts.append(vectors)
    return ids, np.concatenate(parts)


def _check_complete(out, store, counting):
    products = ProductStore(store).products()
    ids, vectors = _ids_and_vectors(out)
    assert ids == [p.id for p in products] and len(set(ids)) == 25
    assert np.array_equal(vectors, counting().encode_products(products))


def test_interrupted_run_resumes_with_only_the_missing_shards(tmp_path, store, counting, interrupted):
    out = tmp_path / "vectors"
    first = counting(fail_after=23)  # shards of 10: two finished, the third interrupted
    with pytest.raises(interrupted):
        embed_store(store, out, first, model="count", shard_size=10, batch_size=4)
    m = read_manifest(out)
    assert [s.index for s in m.shards] == [0, 1] and not m.complete
    assert not (out / "shard-00002.parquet").exists()
    assert not list(out.glob(".*tmp*"))

    second = counting()
    summary = embed_store(store, out, second, model="count", shard_size=10, batch_size=4)
    assert second.encoded == [f"p{i}" for i in range(20, 25)]  # only the missing shard, once
    assert (summary.shards_written, summary.shards_skipped, summary.products) == (1, 2, 5)
    _check_complete(out, store, counting)

    third = counting()
    summary = embed_store(store, out, third, model="count", shard_size=10)
    assert third.calls == 0 and (summary.shards_written, summary.shards_skipped) == (0, 3)


@pytest.mark.parametrize("damage", ["delete", "truncate", "stale-temp"])
def test_missing_or_damaged_shard_is_encoded_again(tmp_path, store, counting, damage):
    out = tmp_path / "vectors"
    embed_store(store, out, counting(), model="count", shard_size=10)
    path = out / "shard-00001.parquet"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:  # a killed run's temporary file beside finished shards: deleted, nothing encoded
        (out / ".shard-00002.parquet.tmp-999").write_bytes(b"partial")
    again = counting()
    if damage == "stale-temp":
        summary = embed_store(store, out, again, model="count", shard_size=10)
        assert again.calls == 0 and not (out / ".shard-00002.parquet.tmp-999").exists()
    else:
        with pytest.warns(UserWarning, match="embedding shard 1 again"):
            summary = embed_store(store, out, again, model="count", shard_size=10)
        assert again.encoded == [f"p{i}" for i in range(10, 20)]
        assert (summary.shards_written, summary.shards_skipped, summary.shards_redone) == (1, 2, 1)
    _check_complete(out, store, counting)


def test_changed_store_is_refused(tmp_path, store_factory, counting):
    root = store_factory(tmp_path / "a", n_products=25)
    out = tmp_path / "vectors"
    embed_store(root, out, counting(), model="count", shard_size=10)
    other = store_factory(tmp_path / "b", n_products=24)
    with pytest.raises(ConfigError, match="product count 25, this run has 24"):
        embed_store(other, out, counting(), model="count", shard_size=10)
    # the same number of products, other ids: the finished shards no longer match the store
    with pytest.raises(ConfigError, match="the store changed"):
        embed_store(store_factory(tmp_path / "c", n_products=25, prefix="x"), out, counting(), model="count",
                    shard_size=10)  # fmt: skip
