"""`moon search INDEX_DIR --text … [--image FILE] [-k 10]`: ranked products as a table or JSON."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--text", default=None, help="Query text.")
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(),  # checked by load_image: a directory, FIFO or device is a one-line error, not a usage block
    help="Query photo (repeatable; a regular image file of at most 64 MiB, or $MOON_MAX_IMAGE_BYTES).",
)
@click.option("-k", "k", default=10, show_default=True, help="Results to return (1-100).")
@click.option("--model", default=None, help="Embedder spec (default: the index's; must match its fingerprint).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let a gme: checkpoint given with --model run its own Python code (never taken from a manifest).",
)
def search(index_dir, text, images, k, model, as_json, trust_remote_code) -> None:
    """Search an index by text and/or photo.

    Without --model the index's own model is loaded: a preset or the saved model directory it
    records (absolute, or relative to the index), never a spec that could run code.
    """
    from moon.data import ProductStore, StoreError, load_image
    from moon.index import VectorIndex, index_store_dir, load_index_embedder, make_query
    from moon.index import search as run_search

    # load_image opens each path with moon.data.safe_open before anything else is loaded: a FIFO,
    # /dev/zero, a socket or a directory is refused at once, a file over the byte limit unread
    query = make_query(text, [load_image(p) for p in images])
    idx = VectorIndex.open(index_dir)
    embedder = load_index_embedder(idx.manifest, model, index_dir=index_dir, trust_remote_code=trust_remote_code)
    try:
        store = ProductStore(index_store_dir(idx.manifest, index_dir))
    except StoreError:
        store = None  # the store moved: ids and scores are still shown
    hits = run_search(idx, embedder, query, k=k, store=store)
    if as_json:
        click.echo(json.dumps([h.__dict__ for h in hits], indent=2, ensure_ascii=False))
        return
    if not hits:
        click.echo("no results (the index is empty)")
        return
    id_width = max(2, *(len(h.id) for h in hits))
    click.echo(f"{'rank':>4}  {'score':>7}  {'id':<{id_width}}  title")
    for h in hits:
        title = h.title if len(h.title) <= 80 else h.title[:79] + "…"
        click.echo(f"{h.rank:>4}  {h.score:>7.4f}  {h.id:<{id_width}}  {title}")
