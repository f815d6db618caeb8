"""Request limits of the HTTP server (every one configurable from ``moon serve``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from moon.errors import ConfigError

#: the longest timeout accepted (one day): longer ones overflow the lock and timer APIs
MAX_TIMEOUT_S = 86_400.0

#: integer limits: name → (lowest, highest or None)
INT_LIMITS: dict[str, tuple[int, int | None]] = {
    "max_body_bytes": (1, None),
    "max_pixels": (1, None),
    "max_text_chars": (1, None),
    "max_k": (1, 100),
    "concurrency": (1, None),
    "max_connections": (1, None),
    "max_batch": (1, 4096),
    "max_queue": (1, None),
}
#: time limits in seconds: each finite, above 0 and at most MAX_TIMEOUT_S
SECONDS_LIMITS = ("timeout_s", "read_timeout_s")
#: the longest a batch waits for more requests (one second: longer only adds latency)
MAX_WAIT_MS = 1000.0


@dataclass(frozen=True)
class ServeLimits:
    """What one request, and the clients together, may ask for.

    Attributes:
        max_body_bytes: request body size (uploads included); larger → 413.
        max_pixels: width × height of an uploaded image; larger → 413.
        max_text_chars: query text length; longer → 400.
        max_k: results per search (1..max_k; at most 100).
        timeout_s: wall-clock budget of one model/search call; slower → 504.
        concurrency: model calls running at once (others queue, inside their timeout).
        read_timeout_s: time a client has to send one whole request (headers and body), counted
            from when the server starts waiting for it; slower → 408 and the connection closed
            (enforced by the server protocol of :mod:`moon.serve.server`).
        max_connections: connections open at once; a new one beyond it replaces the connection
            that has waited longest without a request in progress, or gets a 503 when every
            connection has one (:mod:`moon.serve.server`).
        max_batch: queries encoded together in one model call (dynamic batching: concurrent
            requests are grouped, :mod:`moon.serve.batching`); 1 turns batching off.
        max_wait_ms: while the model is busy, how long the first request of a batch waits for
            others to join it (on an idle model a request runs at once).
        max_queue: queries waiting or being encoded at once; a request beyond it gets a 503 with
            ``Retry-After`` at once instead of waiting.
        allow_truncation: let ``POST /v1/embeddings`` shorten vectors (``dimensions`` below the
            model's dimension) for a model not trained for it (no Matryoshka training); off by
            default, when such requests get a 400 (:mod:`moon.serve.openai_api`).
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 24_000_000
    max_text_chars: int = 1000
    max_k: int = 100
    timeout_s: float = 30.0
    concurrency: int = 2
    read_timeout_s: float = 60.0
    max_connections: int = 256
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    allow_truncation: bool = False

    def __post_init__(self) -> None:
        for name, (low, high) in INT_LIMITS.items():
            value = getattr(self, name)
            integral = (
                isinstance(value, numbers.Real)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and float(value).is_integer()
            )
            if not integral or value < low or (high is not None and value > high):
                bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ConfigError(f"serve limit {name} must be an integer {bounds}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in SECONDS_LIMITS:
            value = getattr(self, name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
                raise ConfigError(
                    f"serve limit {name} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:,.0f}, "
                    f"got {value!r}"
                )
            object.__setattr__(self, name, float(value))
        wait = self.max_wait_ms
        if (
            isinstance(wait, bool)
            or not isinstance(wait, numbers.Real)
            or not math.isfinite(wait)
            or not 0 <= wait <= MAX_WAIT_MS
        ):
            raise ConfigError(
                f"serve limit max_wait_ms must be a number of milliseconds from 0 to {MAX_WAIT_MS:g}, got {wait!r}"
            )
        object.__setattr__(self, "max_wait_ms", float(wait))
        if not isinstance(self.allow_truncation, bool):
            raise ConfigError(f"serve option allow_truncation must be true or false, got {self.allow_truncation!r}")
