"""`moon data synth` and `moon data gallery`: thin wrappers over :mod:`moon.world`."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store directory to write.")
@click.option(
    "--products",
    "n_products",
    default=2000,
    show_default=True,
    type=int,
    help="Number of product listings (1 to 1,000,000).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Random seed, 0 to 4294967295 (same seed → byte-identical store).",
)
@click.option(
    "--profile",
    default="default",
    show_default=True,
    type=click.Choice(["small", "default", "large"]),
    help="Images and queries per product.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out: str, n_products: int, seed: int, profile: str, overwrite: bool, quiet: bool) -> None:
    """Generate the offline product world (deterministic for a seed).

    Products with 3–6 noisy listing images (clean, scene, banner, detail), a 4-level category tree,
    7 visible attribute types, sibling variants and duplicate listings; text, image and multimodal
    queries with purchases over a year; true product boxes in boxes.parquet (source=truth).
    """
    from moon.errors import ConfigError
    from moon.world import synthesize
    from moon.world.synth import MAX_PRODUCTS, MAX_SEED

    # out of range: one line naming the option, before anything is written
    if not 1 <= n_products <= MAX_PRODUCTS:
        raise ConfigError(f"--products: must be in [1, {MAX_PRODUCTS:,}], got {n_products:,}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed: must be in [0, {MAX_SEED:,}], got {seed:,}")
    store = synthesize(
        out, n_products=n_products, seed=seed, profile=profile, show_progress=not quiet, overwrite=overwrite
    )
    counts = store.manifest["counts"]
    click.echo(
        f"{out}: {counts['products']:,} products, {counts['queries']:,} queries, "
        f"{counts['purchases']:,} purchases, {counts.get('boxes', 0):,} true boxes"
    )


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: .html (self-contained) or .png (contact sheet).",
)
@click.option(
    "--n", "n", default=12, show_default=True, type=click.IntRange(min=0), help="Listings (and queries) to show."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Which sample to draw.")
def gallery(store: str, out_file: str, n: int, seed: int) -> None:
    """Write a visual sample of a store: listings with true boxes drawn, queries next to their purchases."""
    from moon.world import write_gallery

    path = write_gallery(store, out_file, n=n, seed=seed)
    click.echo(f"wrote {path}")
