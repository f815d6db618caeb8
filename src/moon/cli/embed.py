"""`moon embed`: embed every product of a store into resumable Parquet vector shards."""

from __future__ import annotations

import click


@click.command()
@click.option("--data", "data", required=True, type=click.Path(file_okay=False), help="Product store to embed.")
@click.option("--model", "model", required=True, help="Embedder spec (moon-tiny, a saved directory, random …).")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for shard-NNNNN.parquet (id, vector) + manifest.json; a rerun resumes it.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: encode in this process; ray: a Ray Data actor pool, one model per actor (pip install 'moon[scale]').",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster to use with --engine ray (default: start a local one on this machine's CPUs, stop it after).",
)
@click.option(
    "--ray-actors",
    default=None,
    type=click.IntRange(1),
    help="Actors (models) in the pool with --engine ray  [default: 2 on CPU, one per GPU with CUDA].",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Products per forward.")
@click.option(
    "--shard-size", default=65_536, show_default=True, type=click.IntRange(1), help="Products per shard file."
)
@click.option("--overwrite", is_flag=True, help="Delete the shards and manifest in --out and start afresh.")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let a gme: checkpoint given with --model run its own Python code (never taken from a manifest).",
)
def embed(
    data, model, out, engine, ray_address, ray_actors, batch_size, shard_size, overwrite, trust_remote_code
) -> None:
    """Embed every product of a store into sharded vector files, resumably.

    Finished shards are recorded in OUT/manifest.json with their sha256; rerunning the same command
    after an interruption (even kill -9) checks and skips them and embeds the rest. Build an index
    from the result with `moon index build --from-vectors OUT --model MODEL --out INDEX`.
    """
    from moon.embed import embed_store
    from moon.embed.ray_engine import RaySettings
    from moon.models import load_embedder

    embedder = load_embedder(model, trust_remote_code=trust_remote_code)
    summary = embed_store(
        data,
        out,
        embedder,
        model=model,
        engine=engine,
        shard_size=shard_size,
        batch_size=batch_size,
        overwrite=overwrite,
        show_progress=True,
        trust_remote_code=trust_remote_code,
        ray=RaySettings(address=ray_address, actors=ray_actors),
    )
    click.echo(summary.format())
