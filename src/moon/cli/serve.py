"""`moon serve INDEX_DIR [--host 127.0.0.1] [--port 8000]`: the JSON API and search page (uvicorn)."""

from __future__ import annotations

import math

import click

from moon.errors import ConfigError
from moon.serve.limits import INT_LIMITS, MAX_TIMEOUT_S, MAX_WAIT_MS, ServeLimits

#: the largest --max-body-mb (1 TiB)
MAX_BODY_MB = 1024 * 1024
#: the defaults and bounds of the options are ServeLimits' own (one home for each number)
_DEFAULT = ServeLimits()


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


class _Number(click.ParamType):
    """An int or a finite float in a range. A bad value is a :class:`ConfigError` naming the
    option, which ``moon``'s entry point prints as one ``error: …`` line (exit 2), like its other
    user errors (click's own ``BadParameter`` prints a usage block)."""

    def __init__(self, kind: type, low: float, high: float | None = None, *, above_low: bool = False):
        self.kind, self.low, self.high, self.above_low = kind, low, high, above_low
        self.name = kind.__name__

    def _wants(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        low = f"above {_fmt(self.low)}" if self.above_low else f"at least {_fmt(self.low)}"
        if self.high is None:
            return f"{what} {low}"
        if self.above_low:
            return f"{what} {low} and at most {_fmt(self.high)}"
        return f"{what} between {_fmt(self.low)} and {_fmt(self.high)}"

    def convert(self, value, param, ctx):
        option = param.opts[0] if param is not None and param.opts else "the value"
        try:
            number = self.kind(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{option} must be {self._wants()}, got {value!r}") from None
        ok = (
            math.isfinite(number)
            and (number > self.low if self.above_low else number >= self.low)
            and (self.high is None or number <= self.high)
        )
        if not ok:
            raise ConfigError(f"{option} must be {self._wants()}, got {value!r}")
        return number


def _int(name: str) -> _Number:
    """An integer option within ``ServeLimits``' bounds for field ``name``."""
    return _Number(int, *INT_LIMITS[name])


def _seconds() -> _Number:
    return _Number(float, 0, MAX_TIMEOUT_S, above_low=True)


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=_Number(int, 0, 65535), help="TCP port (0: any free).")
@click.option("--model", default=None, help="Embedder spec (default: the index's; must match its fingerprint).")
@click.option(
    "--store",
    "store_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Product store (default: the manifest's).",
)
@click.option(
    "--max-body-mb",
    default=_DEFAULT.max_body_bytes / (1024 * 1024),
    show_default=True,
    type=_Number(float, 0, MAX_BODY_MB, above_low=True),
    help="Largest request body (uploads included).",
)
@click.option(
    "--max-pixels",
    default=_DEFAULT.max_pixels,
    show_default=True,
    type=_int("max_pixels"),
    help="Largest uploaded image (width × height).",
)
@click.option(
    "--max-text",
    default=_DEFAULT.max_text_chars,
    show_default=True,
    type=_int("max_text_chars"),
    help="Longest query text (characters).",
)
@click.option("--max-k", default=_DEFAULT.max_k, show_default=True, type=_int("max_k"), help="Most results per search.")
@click.option(
    "--timeout",
    "timeout_s",
    default=_DEFAULT.timeout_s,
    show_default=True,
    type=_seconds(),
    help="Seconds one model/search call may take, queueing included (504 after).",
)
@click.option(
    "--concurrency",
    default=_DEFAULT.concurrency,
    show_default=True,
    type=_int("concurrency"),
    help="Model calls running at once.",
)
@click.option(
    "--read-timeout",
    "read_timeout_s",
    default=_DEFAULT.read_timeout_s,
    show_default=True,
    type=_seconds(),
    help="Seconds a client has to send a whole request, headers and body (408 and closed after).",
)
@click.option(
    "--max-connections",
    default=_DEFAULT.max_connections,
    show_default=True,
    type=_int("max_connections"),
    help="Connections open at once; beyond it the longest-idle one is closed, or 503 if all are busy.",
)
@click.option(
    "--max-batch",
    default=_DEFAULT.max_batch,
    show_default=True,
    type=_int("max_batch"),
    help="Queries encoded together: concurrent requests are grouped into one model call (1: no batching).",
)
@click.option(
    "--max-wait-ms",
    default=_DEFAULT.max_wait_ms,
    show_default=True,
    type=_Number(float, 0, MAX_WAIT_MS),
    help="While the model is busy, how long a batch's first request waits for others (idle: none).",
)
@click.option(
    "--max-queue",
    default=_DEFAULT.max_queue,
    show_default=True,
    type=_int("max_queue"),
    help="Queries waiting or being encoded at once; beyond it a request gets 503 with Retry-After.",
)
@click.option(
    "--allow-truncation",
    is_flag=True,
    help="Let /v1/embeddings shorten vectors (dimensions) for a model not trained for it (docs/serving.md).",
)
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
    read_timeout_s,
    max_connections,
    max_batch,
    max_wait_ms,
    max_queue,
    allow_truncation,
    trust_remote_code,
    log_level,
) -> None:
    """Serve an index over HTTP (JSON API + search page)."""
    import uvicorn

    from moon.index import load_index_embedder, read_manifest
    from moon.serve import ServeLimits, create_app
    from moon.serve.server import server_options

    limits = ServeLimits(
        max_body_bytes=math.ceil(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_text_chars=max_text,
        max_k=max_k,
        timeout_s=timeout_s,
        concurrency=concurrency,
        read_timeout_s=read_timeout_s,
        max_connections=max_connections,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        allow_truncation=allow_truncation,
    )
    manifest = read_manifest(index_dir)
    embedder = load_index_embedder(manifest, model, index_dir=index_dir, trust_remote_code=trust_remote_code)
    app = create_app(index_dir, embedder, limits=limits, store_dir=store_dir)
    click.echo(
        f"serving {manifest.count:,} products ({manifest.kind}, {manifest.model}) at http://{host}:{port}/", err=True
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, **server_options(limits))
