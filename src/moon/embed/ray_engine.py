"""The ``ray`` engine of ``moon embed``: the missing shards encoded by a Ray Data actor pool.

The driver (:func:`moon.embed.run.embed_store`) decides which shards are missing, exactly as for
the local engine; this module turns them into a Ray Dataset of shard tasks (``shard``, ``start``,
``stop``: one row per missing shard, never the finished ones), ``map_batches`` one task at a time
through a pool of :class:`ShardEncoder` actors and yields ``(shard, ids, vectors)`` back to the
driver as they finish, which writes them (atomically, manifest after each) like the local engine.

Each actor loads its own embedder from the model *spec* (a string; ``trust_remote_code`` passed
explicitly, ``py:`` specs refused as for any spec not typed by the user), refuses to run when its
fingerprint or dimension differs from the driver's, reads its shard's rows straight from the
store's ``products.parquet`` (only the row groups that hold them) and encodes them with the same
windows as the local engine (:func:`moon.embed.run.encode_windows`), so the vectors are those of
the local engine. Nothing is pickled from a data file: actors receive the spec, the store path and
integers, and return ids and float32 vectors as Arrow columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moon.errors import ConfigError, DataError

#: actors of the pool when none is given (CPU; with CUDA, one per visible GPU)
DEFAULT_CPU_ACTORS = 2


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError(
            f"--engine ray needs Ray Data ({exc}); install it with `pip install 'moon[scale]'` (ray[data])"
        ) from None
    return ray


@dataclass
class RaySettings:
    """How to reach Ray and size the pool. ``address`` None: start a local cluster (all the
    machine's CPUs) and shut it down afterwards; an already initialised Ray is used as it is."""

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float | None = None


def _read_rows(store: Any, start: int, stop: int) -> list[Any]:
    """Products at rows ``[start, stop)`` of ``store``, read from only the row groups holding them."""
    from moon.data.store import TABLES, StoreError, open_table_file

    path = store.root / "products.parquet"
    pf = open_table_file(path, TABLES["products"])
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + rows > start:
            groups.append(g)
            first = offset if first is None else first
        offset += rows
    if first is None or offset < stop:
        raise StoreError(f"{path}: rows {start:,}..{stop:,} are not in the file ({offset:,} rows)")
    try:
        table = pf.read_row_groups(groups, columns=[f.name for f in TABLES["products"]])
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"{path}: unreadable parquet ({exc})") from exc
    rows = table.slice(start - first, stop - start).to_pylist()
    return [store._product(row) for row in rows]


class ShardEncoder:
    """One Ray actor: one embedder, loaded here from its spec; encodes one shard per call."""

    def __init__(
        self,
        spec: str,
        store_root: str,
        fingerprint: str,
        dim: int,
        batch_size: int,
        trust_remote_code: bool,
        threads: int | None,
    ):
        from moon.data import ProductStore
        from moon.models import load_embedder

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.embedder = load_embedder(spec, trust_remote_code=trust_remote_code)
        got = (self.embedder.fingerprint(), int(self.embedder.dim))
        if got != (fingerprint, dim):
            raise ConfigError(
                f"model {spec!r} loaded in a Ray worker has fingerprint {got[0][:12]} (dim {got[1]}), the driver's "
                f"has {fingerprint[:12]} (dim {dim}); workers must load the same model"
            )
        self.store = ProductStore(store_root)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from moon.embed.run import encode_windows

        shards, all_ids, flat, dims = [], [], [], []
        for task in batch.to_pylist():
            products = _read_rows(self.store, task["start"], task["stop"])
            vectors = encode_windows(self.embedder, products, self.batch_size)
            shards.append(task["shard"])
            all_ids.append([p.id for p in products])
            flat.append(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
            dims.append(vectors.shape[1])
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in flat])]).astype(np.int64)
        return pa.table(
            {
                "shard": pa.array(shards, type=pa.int64()),
                "ids": pa.array(all_ids, type=pa.list_(pa.string())),
                "vectors": pa.LargeListArray.from_arrays(
                    pa.array(offsets), pa.array(np.concatenate(flat) if flat else np.zeros(0, np.float32))
                ),
                "dim": pa.array(dims, type=pa.int64()),
            }
        )


def _gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _batches(ray: Any, ds: Any) -> Iterator[pa.Table]:
    """The dataset's output tables; a worker's own one-line MOON error (a ``ConfigError``: another
    model, ``DataError``: a broken store) is raised here as that error, not as Ray's wrapper."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayError as exc:
        for kind in (ConfigError, DataError):
            lines = [ln for ln in str(exc).splitlines() if ln.startswith(f"moon.errors.{kind.__name__}: ")]
            if lines:
                raise kind(f"in a Ray worker: {lines[-1].split(': ', 1)[1]}") from exc
        raise


def encode_shards(
    *,
    spec: str,
    store_root: Path,
    ranges: list[tuple[int, int]],
    todo: set[int],
    fingerprint: str,
    dim: int,
    batch_size: int,
    trust_remote_code: bool,
    settings: RaySettings,
) -> Iterator[tuple[int, list[str], np.ndarray]]:
    """``(shard, ids, float32 vectors)`` of every shard in ``todo``, in the order they finish."""
    ray = import_ray()
    if not todo:
        return
    started_here = False
    if not ray.is_initialized():
        if settings.address:
            ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        started_here = True  # connected (or started) by us: disconnect (and stop a local one) after
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the library's own bar counts the shards
        gpus = _gpus()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = settings.actors or (max(1, gpus) if gpus else DEFAULT_CPU_ACTORS)
        # threads per actor from the pool size asked for, not from how many shards are missing: a
        # resumed run then encodes with the same torch threads (CPU float sums depend on them)
        cpus_per_actor = settings.cpus_per_actor or (1 if gpus else max(1, cpus // actors))
        actors = max(1, min(actors, len(todo)))
        tasks = [{"shard": i, "start": ranges[i][0], "stop": ranges[i][1]} for i in sorted(todo)]
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            ShardEncoder,
            fn_constructor_kwargs={
                "spec": spec,
                "store_root": str(store_root),
                "fingerprint": fingerprint,
                "dim": dim,
                "batch_size": batch_size,
                "trust_remote_code": bool(trust_remote_code),
                "threads": None if gpus else int(cpus_per_actor),
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=1 if gpus else None,
        )
        for table in _batches(ray, ds):
            for row in range(table.num_rows):
                shard = table.column("shard")[row].as_py()
                row_dim = table.column("dim")[row].as_py()
                if shard not in todo or row_dim != dim:
                    raise DataError(f"a Ray worker returned shard {shard} (dim {row_dim}), which was not asked for")
                ids = table.column("ids")[row].as_py()
                flat = table.column("vectors")[row].values.to_numpy(zero_copy_only=False)
                yield shard, ids, np.asarray(flat, dtype=np.float32).reshape(len(ids), dim)
    finally:
        if started_here:
            ray.shutdown()
