"""``/metrics``: request counts and latencies, batching and index gauges, with ``prometheus_client``.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (never the process-wide default
one), so two apps in one process keep separate counts. Labels are bounded: ``route`` is the
matched route's path template (``/products/{product_id}``, never the raw URL; every path no route
matches is ``(unmatched)``), ``method`` one of :data:`METHODS` or ``OTHER``, ``status`` the HTTP
status the app answered. The metrics (docs/serving.md, "Metrics"):

- ``moon_requests_total{route,method,status}`` (counter)
- ``moon_request_seconds{route,method,status}`` (histogram, :data:`BUCKETS`)
- ``moon_batch_size`` (histogram of queries per model call, :data:`BATCH_BUCKETS`)
- ``moon_batch_largest``, ``moon_batch_queue_depth`` (gauges read from the batcher when scraped)
- ``moon_index_products``, ``moon_uptime_seconds`` (gauges)
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from moon.serve.batching import Batcher

#: latency buckets, seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: batch-size buckets, queries (``max_batch`` is at most 4096)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: HTTP methods counted by name; any other is counted as ``OTHER``
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: the ``route`` label of every request no route matched
UNMATCHED = "(unmatched)"


class Metrics:
    """The metrics of one app, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("route", "method", "status")
        self.requests = Counter(
            "moon_requests", "HTTP requests by route template, method and status.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "moon_request_seconds",
            "HTTP request latency in seconds by route template, method and status.",
            labels,
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "moon_batch_size",
            "Queries encoded together in one model call (dynamic batching).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_largest = Gauge(
            "moon_batch_largest", "The most queries encoded in one model call so far.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "moon_batch_queue_depth", "Queries waiting or being encoded now.", registry=self.registry
        )
        self.index_products = Gauge("moon_index_products", "Vectors in the served index.", registry=self.registry)
        started = time.time()
        uptime = Gauge("moon_uptime_seconds", "Seconds since the app was created.", registry=self.registry)
        uptime.set_function(lambda: time.time() - started)

    def track(self, batcher: Batcher) -> None:
        """Read the queue depth and largest batch from ``batcher`` at each scrape (the batch-size
        histogram is fed by the batcher's ``on_batch`` hook: :meth:`observe_batch`)."""
        self.queue_depth.set_function(lambda: batcher.stats().queued)
        self.batch_largest.set_function(lambda: batcher.stats().largest)

    def observe(self, route: str | None, method: str, status: int, seconds: float) -> None:
        """Count one request: ``route`` is the matched path template (``None``: unmatched)."""
        labels = (route or UNMATCHED, method if method in METHODS else "OTHER", str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type: the Prometheus text format, or OpenMetrics when
        ``accept`` asks for it (``prometheus_client``'s own negotiation)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
