"""`moon search INDEX_DIR --text … [--image FILE] [-k 10]`: ranked products as a table or JSON."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--text", default=None, help="Query text.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False), help="Query photo (repeatable).")
@click.option("-k", "k", default=10, show_default=True, help="Results to return (1-100).")
@click.option("--model", default=None, help="Embedder spec (default: the index's; must match its fingerprint).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search(index_dir, text, images, k, model, as_json) -> None:
    """Search an index by text and/or photo."""
    from moon.data import ProductStore, StoreError, load_image
    from moon.index import VectorIndex, load_index_embedder, make_query
    from moon.index import search as run_search

    query = make_query(text, [load_image(p) for p in images])
    idx = VectorIndex.open(index_dir)
    embedder = load_index_embedder(idx.manifest, model)
    try:
        store = ProductStore(idx.manifest.store)
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
