"""`moon data …`: product stores (stats, validate, import-mbe; synth and gallery from moon.world)."""

from __future__ import annotations

import json

import click

from moon.cli import LazyGroup

_LAZY = {
    "synth": ("moon.cli.data_world", "synth", "Generate the offline product world (deterministic for a seed)."),
    "gallery": ("moon.cli.data_world", "gallery", "Write a visual sample of a store (listings, boxes, queries)."),
}


@click.group(cls=LazyGroup, lazy=_LAZY)
def data() -> None:
    """Product stores: synthesise, import MBE, validate, stats, gallery."""


def _print_stats(stats: dict) -> None:
    click.echo(f"products   {stats['products']:>10,}")
    click.echo(f"queries    {stats['queries']:>10,}")
    click.echo(f"purchases  {stats['purchases']:>10,}")
    click.echo(
        f"categories {stats['category_levels']} levels, {stats['leaf_categories']:,} leaf paths; depth histogram "
        + ", ".join(f"{k}: {v}" for k, v in stats["category_depth_histogram"].items())
    )
    ipp = stats["images_per_product"]
    click.echo(f"images     {ipp['mean']:.2f} per product (min {ipp['min']}, max {ipp['max']})")
    click.echo(f"attributes {len(stats['attribute_types'])} types")
    for name, info in stats["attribute_types"].items():
        click.echo(f"  {name:<16} {info['products']:>8,} products  {info['values']:>6,} values")
    click.echo("query modality: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats["query_modality"].items())))
    for split, mix in stats["query_modality_by_split"].items():
        click.echo(f"  {split:<6} " + ", ".join(f"{k} {v:,}" for k, v in sorted(mix.items())))
    click.echo("purchases by split: " + ", ".join(f"{k} {v:,}" for k, v in stats["purchases_by_split"].items()))
    dup = stats["duplicate_listings"]
    click.echo(f"duplicate listings: {dup['groups']:,} groups, {dup['products']:,} products")
    if stats["boxes_by_source"]:
        click.echo("boxes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats["boxes_by_source"].items())))


@data.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def stats(store: str, as_json: bool) -> None:
    """Counts, category depths, attribute types, images per product, query modalities, splits."""
    from moon.data import ProductStore

    numbers = ProductStore(store).stats()
    if as_json:
        click.echo(json.dumps(numbers, indent=2, ensure_ascii=False))
    else:
        _print_stats(numbers)


@data.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--images/--no-images", "check_images", default=False, help="Also decode every image (slow).")
@click.option("--max-per-kind", default=10, show_default=True, help="Problems listed per kind.")
def validate(store: str, check_images: bool, max_per_kind: int) -> None:
    """Check a store: duplicate or dangling ids, missing files, bad values, manifest counts.

    Exits 1 with a readable report when anything is wrong.
    """
    from moon.data import ProductStore

    report = ProductStore(store).validate(check_images=check_images)
    if report.ok:
        click.echo(f"{store}: store is valid")
        return
    click.echo(f"{store}: " + report.format(max_per_kind), err=True)
    raise SystemExit(1)


@data.command("import-mbe")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store directory to write.")
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False, exists=True),
    help="Folder holding the image files (matched by file name).",
)
@click.option(
    "--query-columns", default=None, help="Query-side columns, e.g. 'text=query,image=query_image,product=id'."
)
@click.option(
    "--split",
    default="test",
    show_default=True,
    type=click.Choice(["train", "val", "test"]),
    help="Split of the queries (or prefix a source with train=/val=/test=).",
)
@click.option("--download", is_flag=True, help="Download images that are URLs and not found locally.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Download cache (default ~/.cache/moon/mbe-images).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
@click.option(
    "--allow-outside-images",
    is_flag=True,
    help="Copy image files the data names outside --images and the source file's folder (e.g. ../x.jpg).",
)
def import_mbe_cmd(
    sources, out, images_dir, query_columns, split, download, cache_dir, overwrite, allow_outside_images
) -> None:
    """Import MBE files (json, jsonl, parquet, csv) into a product store.

    SOURCES are files, each optionally prefixed with its split: train=train.parquet test=test.jsonl.
    Bad rows (bad bytes, wrong types, too deep) and unavailable images are reported (file:row and
    reason) and skipped; good rows are kept; over-long text is cut with a warning. The full list is
    written to STORE/import-report.jsonl.
    """
    from moon.data.mbe import QueryColumns, import_mbe

    _, report = import_mbe(
        list(sources),
        out,
        images_dir=images_dir,
        query_columns=QueryColumns.parse(query_columns),
        split=split,
        download=download,
        cache_dir=cache_dir,
        overwrite=overwrite,
        progress=True,
        allow_outside_images=allow_outside_images,
    )
    click.echo(report.format())
