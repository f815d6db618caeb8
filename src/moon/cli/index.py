"""`moon index …`: build a FAISS index of a product store, add/remove products, show its manifest."""

from __future__ import annotations

import json

import click


@click.group()
def index() -> None:
    """Build and update a vector index of a product store."""


@index.command()
@click.option("--model", "model", required=True, help="Embedder spec (moon-tiny, a saved directory, random …).")
@click.option(
    "--data",
    "data",
    default=None,
    type=click.Path(file_okay=False),
    help="Product store to index (with --from-vectors: default the store the vectors name).",
)
@click.option(
    "--from-vectors",
    "from_vectors",
    default=None,
    type=click.Path(file_okay=False),
    help="Index the shards written by `moon embed` instead of encoding (--model must be the model that wrote them).",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option(
    "--kind",
    type=click.Choice(["auto", "exact", "hnsw", "ivfpq"]),
    default="auto",
    show_default=True,
    help="auto: exact up to --exact-limit products, HNSW up to 10M, IVF-PQ beyond.",
)
@click.option("--exact-limit", default=1_000_000, show_default=True, help="Largest catalogue searched exactly (auto).")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Index parameter (M, ef_search, nlist, nprobe, pq_m …).",
)
@click.option("--batch-size", default=64, show_default=True, help="Products encoded per batch.")
@click.option(
    "--recall-queries",
    default=1000,
    show_default=True,
    help="Queries for the Recall@10 check: the store's own (encoded), else held-out products.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing index in --out (only once the new one is complete). Never a store's folder.",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let a gme: checkpoint given with --model run its own Python code (never taken from a manifest).",
)
def build(
    model, data, from_vectors, out, kind, exact_limit, params, batch_size, recall_queries, overwrite, trust_remote_code
) -> None:
    """Encode every product of a store and write a FAISS index with its manifest.

    A model directory and the store are recorded as absolute paths and relative to --out, so the
    index works from any directory and after moving the index together with them. With
    --from-vectors the vectors of `moon embed` are indexed as they are (checked, not re-encoded).
    """
    from moon.errors import ConfigError
    from moon.index import build_index
    from moon.models import load_embedder

    parsed = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        try:
            parsed[key] = int(value)
        except ValueError as exc:
            raise ConfigError(f"--param {item!r}: the value must be an integer") from exc
    if data is None and from_vectors is None:
        raise ConfigError("give the product store to index (--data) or the vectors of `moon embed` (--from-vectors)")
    embedder = load_embedder(model, trust_remote_code=trust_remote_code)
    options = dict(model=model, kind=kind, params=parsed, exact_limit=exact_limit, recall_queries=recall_queries,
                   overwrite=overwrite, show_progress=True)  # fmt: skip
    if from_vectors is not None:
        from moon.index.from_vectors import build_index_from_shards

        idx = build_index_from_shards(from_vectors, out, embedder, store=data, **options)
    else:
        idx = build_index(embedder, data, out, batch_size=batch_size, **options)
    m = idx.manifest
    recall = "n/a" if m.recall_at_10 is None else f"{m.recall_at_10:.4f} on {m.recall_queries:,} {m.recall_source}"
    click.echo(f"{out}: {m.count:,} products, {m.kind} index, dim {m.dim}, Recall@10 vs exact {recall}")


@index.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option(
    "--id",
    "ids",
    multiple=True,
    help="Product id to add or re-encode (repeatable). Default: every store product not yet indexed.",
)
@click.option("--ids-file", type=click.File("r", encoding="utf-8"), help="A file with one product id per line.")
@click.option(
    "--model", default=None, help="Embedder spec (default: the one in the manifest; must match its fingerprint)."
)
@click.option("--batch-size", default=64, show_default=True)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let a gme: checkpoint given with --model run its own Python code (never taken from a manifest).",
)
def add(index_dir, ids, ids_file, model, batch_size, trust_remote_code) -> None:
    """Add products of the index's store (new ids are added, existing ones re-encoded).

    Holds the index's lock from reading it to saving it: concurrent add/remove runs wait for each
    other and none is lost; searches and servers keep reading the old index until it is saved.
    """
    from moon.data import ProductStore
    from moon.errors import DataError
    from moon.index import VectorIndex, add_products, index_store_dir, load_index_embedder, read_manifest

    wanted = list(ids) + ([line.strip() for line in ids_file if line.strip()] if ids_file else [])
    manifest = read_manifest(index_dir)  # the model is loaded before the lock is taken
    embedder = load_index_embedder(manifest, model, index_dir=index_dir, trust_remote_code=trust_remote_code)
    with VectorIndex.edit(index_dir) as idx:
        store = ProductStore(index_store_dir(idx.manifest, index_dir))
        if wanted:
            products = []
            for pid in wanted:
                try:
                    products.append(store.product(pid))
                except KeyError:
                    raise DataError(f"product id {pid!r} is not in the store {store.root}") from None
        else:
            products = [p for p in store.iter_products() if p.id not in idx]
        added, replaced = add_products(idx, embedder, products, batch_size=batch_size, show_progress=True)
        idx.save()
    click.echo(f"{index_dir}: added {added:,}, re-encoded {replaced:,}; {len(idx):,} products indexed")


@index.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("ids", nargs=-1)
@click.option("--ids-file", type=click.File("r", encoding="utf-8"), help="A file with one product id per line.")
def remove(index_dir, ids, ids_file) -> None:
    """Remove products from the index by id (holding the index's lock, like add)."""
    from moon.errors import ConfigError
    from moon.index import VectorIndex

    wanted = list(ids) + ([line.strip() for line in ids_file if line.strip()] if ids_file else [])
    if not wanted:
        raise ConfigError("give the product ids to remove (arguments or --ids-file)")
    with VectorIndex.edit(index_dir) as idx:
        removed = idx.remove(wanted)
        idx.save()
    click.echo(f"{index_dir}: removed {removed:,} of {len(set(wanted)):,} ids; {len(idx):,} products indexed")


@index.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(index_dir, as_json) -> None:
    """Show an index's manifest: model, kind, size, measured recall."""
    from moon.index import read_manifest

    m = read_manifest(index_dir)
    if as_json:
        click.echo(json.dumps(m.to_dict(), indent=2, sort_keys=True, ensure_ascii=False))
        return
    recall = "n/a" if m.recall_at_10 is None else f"{m.recall_at_10:.4f}"
    rows = [
        ("model", m.model),
        ("fingerprint", m.fingerprint),
        ("kind", f"{m.kind} ({m.metric})"),
        ("params", ", ".join(f"{k}={v}" for k, v in sorted(m.params.items())) or "-"),
        ("products", f"{m.count:,}"),
        ("dim", str(m.dim)),
        (
            "recall@10",
            f"{recall} vs exact ({m.recall_queries:,} {m.recall_source or 'queries'} not in the index, "
            f"over {m.recall_count:,} vectors)",
        ),
        ("store", m.store),
        ("created", m.created),
        ("updated", m.updated),
    ]
    for key, value in rows:
        click.echo(f"{key:<12} {value}")
