"""``embed_store``: embed every product of a store into vector shards, resumably (engines local and ray)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moon import progress
from moon.data import Product, ProductStore
from moon.embed.ray_engine import RaySettings
from moon.embed.shards import (
    MANIFEST_FILE,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    VectorFormatError,
    VectorsManifest,
    check_shard_file,
    ids_sha256,
    read_manifest,
    shard_name,
    shard_ranges,
    write_manifest,
    write_shard,
)
from moon.errors import ConfigError, DataError
from moon.models import Embedder
from moon.models.encoding import WINDOW_BATCHES

DEFAULT_SHARD_SIZE = 65_536  # 16 × 4096: windows of any power-of-two batch size ≤ 4096 fit whole
#: ``local``: this process; ``ray``: a Ray Data actor pool (:mod:`moon.embed.ray_engine`)
ENGINES = ("local", "ray")


@dataclass
class EmbedSummary:
    """What one :func:`embed_store` call did. ``products`` counts those encoded by this call."""

    out_dir: str
    engine: str
    products: int
    products_total: int
    seconds: float
    shards_written: int
    shards_skipped: int
    shards_redone: int
    dim: int
    fingerprint: str

    @property
    def products_per_second(self) -> float:
        return self.products / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        redone = f" ({self.shards_redone} damaged or missing, embedded again)" if self.shards_redone else ""
        return (
            f"{self.out_dir}: {self.products_total:,} products in {self.shards_written + self.shards_skipped} shards, "
            f"dim {self.dim}; embedded {self.products:,} products now ({self.products_per_second:.1f} products/s, "
            f"engine {self.engine}); shards written {self.shards_written}{redone}, "
            f"skipped (already finished) {self.shards_skipped}"
        )


def _clear(out: Path) -> None:
    """Delete what ``moon embed`` wrote in ``out`` (manifest, shards, temporary files); nothing else."""
    for path in out.iterdir():
        name = path.name.lstrip(".")
        if path.is_file() and (
            name in (MANIFEST_FILE, MANIFEST_FILE + ".tmp") or (name.startswith(SHARD_PREFIX) and SHARD_SUFFIX in name)
        ):
            path.unlink()


def _check_out(out: Path) -> None:
    """Refuse a folder that holds something other than vectors (a product store, an index)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    for marker in ("products.parquet", "ids.parquet"):
        if (out / marker).exists():
            raise ConfigError(f"{out}: holds {marker} (a product store or an index); embed into another --out")
    if (out / MANIFEST_FILE).exists():
        read_manifest(out)  # a foreign manifest.json is refused here, even with overwrite


def _resume(manifest: VectorsManifest, out: Path, ranges: list[tuple[int, int]], store_ids: list[str]) -> int:
    """Drop the records of shards whose file is missing or damaged (they are embedded again) and
    refuse a store whose ids changed; returns how many records were dropped."""
    dropped = 0
    for record in list(manifest.shards):
        start, stop = ranges[record.index]
        if ids_sha256(store_ids[start:stop]) != record.ids_sha256:
            raise ConfigError(
                f"{out}: shard {record.index} holds other ids than rows {start:,}..{stop:,} of the store now "
                "(the store changed since it was embedded); embed into another --out or pass --overwrite"
            )
        try:
            check_shard_file(out / record.file, record)
        except VectorFormatError as exc:
            warnings.warn(f"{exc}; embedding shard {record.index} again", stacklevel=3)
            manifest.shards.remove(record)
            dropped += 1
    return dropped


def _shards(store: ProductStore, ranges: list[tuple[int, int]], todo: set[int]) -> Iterator[tuple[int, list[Product]]]:
    """``(shard index, its products)`` for the shards in ``todo``, streaming the store once."""
    batch: list[Product] = []
    shard = 0
    for row, product in enumerate(store.iter_products()):
        while shard < len(ranges) and row >= ranges[shard][1]:
            shard += 1
        if shard in todo:
            batch.append(product)
            if row == ranges[shard][1] - 1:
                yield shard, batch
                batch = []


def encode_windows(embedder: Embedder, products: list[Product], batch_size: int, bar: object = None) -> np.ndarray:
    """The products' vectors through the embedder's own ``encode_products`` (the library's one
    encode loop), called a window of ``batch_size`` × :data:`WINDOW_BATCHES` products at a time —
    the windows ``encode_products`` itself uses, so the vectors are the same as one call on the
    whole shard — updating ``bar`` (if any) after each. Both engines encode through this."""
    window = batch_size * WINDOW_BATCHES
    parts = []
    for start in range(0, len(products), window):
        chunk = products[start : start + window]
        vectors = np.asarray(embedder.encode_products(chunk, batch_size=batch_size), dtype=np.float32)
        if vectors.shape != (len(chunk), int(embedder.dim)):
            raise DataError(
                f"embedder {embedder.name!r} returned shape {vectors.shape} for {len(chunk)} products "
                f"(expected ({len(chunk)}, {embedder.dim}))"
            )
        if not np.isfinite(vectors).all():
            raise DataError(f"embedder {embedder.name!r} returned NaN or infinite vectors")
        parts.append(vectors)
        if bar is not None:
            bar.update(len(chunk))  # type: ignore[attr-defined]
    return np.concatenate(parts)


def embed_store(
    store: ProductStore | str | os.PathLike,
    out_dir: str | os.PathLike,
    embedder: Embedder,
    *,
    model: str | None = None,
    engine: str = "local",
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 64,
    overwrite: bool = False,
    show_progress: bool = False,
    trust_remote_code: bool = False,
    ray: RaySettings | None = None,
) -> EmbedSummary:
    """Embed every product of ``store`` with ``embedder`` into ``out_dir`` (format: :mod:`moon.embed.shards`).

    ``model`` is the spec the user gave (recorded in the manifest; default ``embedder.name``).
    Shards already finished in ``out_dir`` by the same model (fingerprint), shard size and store
    are checked (sha256, ids) and skipped; a missing or damaged one is embedded again. A directory
    of another model or shard size, or of a store whose products changed, is a
    :class:`ConfigError` (``overwrite=True`` deletes its shards and manifest and starts afresh).

    ``engine="ray"`` encodes the missing shards in a Ray Data actor pool (``ray``: address, actors,
    CPUs per actor; see :mod:`moon.embed.ray_engine`): each actor loads the model from the spec
    ``model`` (with ``trust_remote_code`` as given) and must get ``embedder``'s fingerprint; this
    process writes the shards and manifest exactly as the local engine does.
    """
    from moon.index.references import store_reference

    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: this version has {', '.join(ENGINES)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be >= 1")
    store = store if isinstance(store, ProductStore) else ProductStore(store)
    out = Path(out_dir)
    model = model or embedder.name
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out)
    store_ids = store.product_ids()
    n = len(store_ids)
    if n == 0:
        raise DataError(f"{store.root}: the store has no products to embed")
    if len(set(store_ids)) != n:
        raise DataError(f"{store.root}: {n - len(set(store_ids)):,} duplicate product ids")
    ranges = shard_ranges(n, shard_size)
    fingerprint, dim = embedder.fingerprint(), int(embedder.dim)
    manifest = read_manifest(out) if (out / MANIFEST_FILE).exists() else None
    redone = 0
    if manifest is not None:
        where = out / MANIFEST_FILE
        if (manifest.fingerprint, manifest.dim) != (fingerprint, dim):
            raise ConfigError(
                f"{where}: embedded by model {manifest.model!r} (fingerprint {manifest.fingerprint[:12]}, "
                f"dim {manifest.dim}), but {model!r} has fingerprint {fingerprint[:12]} (dim {dim}); "
                "pass the same model, another --out, or --overwrite"
            )
        for name, ours, theirs in (
            ("shard size", shard_size, manifest.shard_size),
            ("product count", n, manifest.products),
        ):
            if ours != theirs:
                raise ConfigError(
                    f"{where}: embedded with {name} {theirs:,}, this run has {ours:,}; "
                    "pass the same, another --out, or --overwrite"
                )
        redone = _resume(manifest, out, ranges, store_ids)
    else:
        manifest = VectorsManifest(
            model=model, fingerprint=fingerprint, dim=dim, store="", products=n, shard_size=shard_size
        )
        refs = store_reference(store.root, out)
        manifest.store, manifest.store_relative = refs["store"], refs["store_relative"]
    for stale in out.glob(f".{SHARD_PREFIX}*{SHARD_SUFFIX}.tmp-*"):  # temporary files of a killed run
        stale.unlink(missing_ok=True)
    finished = {s.index for s in manifest.shards}
    todo = set(range(len(ranges))) - finished
    skipped = len(finished)
    done_before = sum(b - a for i, (a, b) in enumerate(ranges) if i in finished)
    written = encoded = 0
    started = time.perf_counter()
    with progress.bar(n, "embed products", enabled=show_progress, unit="product", initial=done_before) as bar:
        if engine == "ray":
            from moon.embed.ray_engine import encode_shards

            results = encode_shards(
                spec=model,
                store_root=store.root,
                ranges=ranges,
                todo=todo,
                fingerprint=fingerprint,
                dim=dim,
                batch_size=batch_size,
                trust_remote_code=trust_remote_code,
                settings=ray or RaySettings(),
            )
        else:
            results = (
                (index, [p.id for p in products], encode_windows(embedder, products, batch_size, bar))
                for index, products in _shards(store, ranges, todo)
            )
        seen: set[int] = set()
        for index, ids, vectors in results:
            start, stop = ranges[index]
            if index in seen:
                raise DataError(f"engine {engine}: shard {index} came back twice")
            seen.add(index)
            if ids != store_ids[start:stop]:
                raise DataError(
                    f"{store.root}: products.parquet yields other ids than its id column at rows {start:,}.."
                )
            if engine == "ray":
                bar.update(len(ids))
            record = write_shard(out, index, start, ids, vectors)
            manifest.shards = [s for s in manifest.shards if s.index != index] + [record]
            write_manifest(out, manifest)
            written += 1
            encoded += len(ids)
    seconds = time.perf_counter() - started
    if not manifest.complete:
        missing = sorted(todo - {s.index for s in manifest.shards})
        raise DataError(f"{out}: shards {', '.join(shard_name(i) for i in missing[:5])} … not written; rerun to finish")
    return EmbedSummary(
        out_dir=str(out),
        engine=engine,
        products=encoded,
        products_total=n,
        seconds=seconds,
        shards_written=written,
        shards_skipped=skipped,
        shards_redone=redone,
        dim=dim,
        fingerprint=fingerprint,
    )
