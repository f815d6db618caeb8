"""Request limits of the HTTP server (every one configurable from ``moon serve``)."""

from __future__ import annotations

from dataclasses import dataclass

from moon.errors import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for.

    Attributes:
        max_body_bytes: request body size (uploads included); larger → 413.
        max_pixels: width × height of an uploaded image; larger → 413.
        max_text_chars: query text length; longer → 400.
        max_k: results per search (1..max_k; at most 100).
        timeout_s: wall-clock budget of one model/search call; slower → 504.
        concurrency: model calls running at once (others queue, inside their timeout).
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 24_000_000
    max_text_chars: int = 1000
    max_k: int = 100
    timeout_s: float = 30.0
    concurrency: int = 2

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "max_text_chars", "max_k", "concurrency"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"serve limit {name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_k <= 100:
            raise ConfigError(f"serve limit max_k must be between 1 and 100, got {self.max_k}")
        if self.timeout_s <= 0:
            raise ConfigError(f"serve limit timeout_s must be positive, got {self.timeout_s}")
