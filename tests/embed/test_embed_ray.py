"""`moon embed --engine ray`: a local 2-CPU Ray cluster (started and stopped here) writes the
same shards as the local engine, and resumes only what is missing.

Ray is a dependency of the ``scale`` extra and installed in the dev environment: these tests are
never skipped; if Ray cannot start, they fail with Ray's own error.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from moon.data import ProductStore
from moon.embed import VectorShards, embed_store, read_manifest
from moon.embed.ray_engine import RaySettings
from moon.errors import ConfigError


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _read_all(out) -> tuple[list[str], np.ndarray]:
    ids, parts = [], []
    for shard_ids, vectors in VectorShards.open(out):
        ids.extend(shard_ids)
        parts.append(vectors)
    return ids, np.concatenate(parts)


def test_cli_engine_ray_starts_and_stops_its_own_local_cluster(tmp_path, store):
    # runs before the module's cluster exists: `moon embed --engine ray` starts one, then stops it
    import ray
    from click.testing import CliRunner

    from moon.cli import cli

    assert not ray.is_initialized()
    out = tmp_path / "vectors"
    args = ["embed", "--data", str(store), "--model", "moon-tiny", "--out", str(out), "--shard-size", "10"]
    result = CliRunner().invoke(cli, [*args, "--engine", "ray", "--ray-actors", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "25 products in 3 shards" in result.output and "engine ray" in result.output
    assert not ray.is_initialized()
    ids, _ = _read_all(out)
    assert ids == [p.id for p in ProductStore(store).products()]
    assert "--ray-address" in CliRunner().invoke(cli, ["embed", "--help"]).output


def test_ray_engine_writes_the_local_engines_shards_and_resumes(tmp_path, store_factory, tiny_model, ray_cluster):
    root = store_factory(tmp_path / "store", n_products=40)
    store_ids = [p.id for p in ProductStore(root).products()]
    local, remote = tmp_path / "local", tmp_path / "ray"
    embed_store(root, local, tiny_model, model="moon-tiny", shard_size=12, batch_size=2)
    settings = RaySettings(actors=2, cpus_per_actor=1)  # one torch thread per actor, as tiny_model here
    started = time.perf_counter()
    summary = embed_store(
        root, remote, tiny_model, model="moon-tiny", engine="ray", shard_size=12, batch_size=2, ray=settings
    )
    first_run = time.perf_counter() - started
    assert (summary.engine, summary.products, summary.shards_written, summary.shards_skipped) == ("ray", 40, 4, 0)
    assert ray_cluster.is_initialized()  # a cluster the caller started is left running

    ids, vectors = _read_all(remote)
    assert ids == store_ids and len(set(ids)) == len(ids)  # store order, no duplicates
    local_ids, local_vectors = _read_all(local)
    assert ids == local_ids
    # exactly equal: same spec and weights, same windows, one torch thread per actor as here (on CPU
    # another thread count can change the last float bits, as in any two torch processes)
    assert vectors.dtype == np.float32 and np.array_equal(vectors, local_vectors)
    m, ml = read_manifest(remote), read_manifest(local)
    assert (m.model, m.fingerprint, m.dim, m.shard_size, m.products) == (
        ml.model, ml.fingerprint, ml.dim, ml.shard_size, ml.products
    )  # fmt: skip
    assert [(s.index, s.start, s.rows, s.sha256, s.ids_sha256) for s in sorted(m.shards, key=lambda s: s.index)] == [
        (s.index, s.start, s.rows, s.sha256, s.ids_sha256) for s in sorted(ml.shards, key=lambda s: s.index)
    ]  # the same parquet bytes as the local engine's

    # resume: a deleted shard is the only one the Ray job gets
    (remote / "shard-00002.parquet").unlink()
    before = {s.index: (remote / s.file).stat().st_mtime_ns for s in m.shards if s.index != 2}
    with pytest.warns(UserWarning, match="embedding shard 2 again"):
        summary = embed_store(
            root, remote, tiny_model, model="moon-tiny", engine="ray", shard_size=12, batch_size=2, ray=settings
        )
    assert (summary.products, summary.shards_written, summary.shards_skipped, summary.shards_redone) == (12, 1, 3, 1)
    assert {i: (remote / f"shard-0000{i}.parquet").stat().st_mtime_ns for i in before} == before
    ids, again = _read_all(remote)
    assert ids == store_ids and np.array_equal(again, local_vectors)

    # nothing missing: no Ray job at all
    summary = embed_store(
        root, remote, tiny_model, model="moon-tiny", engine="ray", shard_size=12, batch_size=2, ray=settings
    )
    assert (summary.products, summary.shards_written, summary.shards_skipped) == (0, 0, 4)
    print(f"ray engine, 40 products / 4 shards on 2 actors: {first_run:.1f}s (actor start-up included)")


def test_a_worker_with_another_model_is_refused(tmp_path, store, tiny_model, ray_cluster):
    # the driver's embedder is moon-tiny, the spec the workers load is another model: refused
    out = tmp_path / "vectors"
    with pytest.raises(ConfigError, match="in a Ray worker: model 'random:3' .* workers must load the same model"):
        embed_store(store, out, tiny_model, model="random:3", engine="ray", shard_size=10, ray=RaySettings(actors=1))
    assert not list(out.glob("shard-*"))
