"""`moon serve INDEX_DIR [--host 127.0.0.1] [--port 8000]`: the JSON API and search page (uvicorn)."""

from __future__ import annotations

import click


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model", default=None, help="Embedder spec (default: the index's; must match its fingerprint).")
@click.option(
    "--store",
    "store_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Product store (default: the manifest's).",
)
@click.option("--max-body-mb", default=8.0, show_default=True, help="Largest request body (uploads included).")
@click.option("--max-pixels", default=24_000_000, show_default=True, help="Largest uploaded image (width × height).")
@click.option("--max-text", default=1000, show_default=True, help="Longest query text (characters).")
@click.option("--max-k", default=100, show_default=True, type=click.IntRange(1, 100), help="Most results per search.")
@click.option(
    "--timeout", "timeout_s", default=30.0, show_default=True, help="Seconds one request may take (504 after)."
)
@click.option("--concurrency", default=2, show_default=True, help="Model calls running at once.")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let a gme: checkpoint given with --model run its own Python code (never taken from a manifest).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(
    index_dir,
    host,
    port,
    model,
    store_dir,
    max_body_mb,
    max_pixels,
    max_text,
    max_k,
    timeout_s,
    concurrency,
    trust_remote_code,
    log_level,
) -> None:
    """Serve an index over HTTP (JSON API + search page)."""
    import uvicorn

    from moon.index import load_index_embedder, read_manifest
    from moon.serve import ServeLimits, create_app

    limits = ServeLimits(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_text_chars=max_text,
        max_k=max_k,
        timeout_s=timeout_s,
        concurrency=concurrency,
    )
    manifest = read_manifest(index_dir)
    embedder = load_index_embedder(manifest, model, index_dir=index_dir, trust_remote_code=trust_remote_code)
    app = create_app(index_dir, embedder, limits=limits, store_dir=store_dir)
    click.echo(
        f"serving {manifest.count:,} products ({manifest.kind}, {manifest.model}) at http://{host}:{port}/", err=True
    )
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024
    )
