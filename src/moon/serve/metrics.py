"""Request counters and latency histograms, rendered in the Prometheus text format at ``/metrics``."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Thread-safe counters: requests by (route, method, status) and latency by route."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.gauges: dict[str, float] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1
            self.latency_count[route] += 1
            self.latency_sum[route] += seconds
            buckets = self.latency_buckets[route]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1

    def render(self) -> str:
        """The metrics as Prometheus exposition text."""
        lines = [
            "# HELP moon_requests_total HTTP requests by route, method and status.",
            "# TYPE moon_requests_total counter",
        ]
        with self._lock:
            for (route, method, status), n in sorted(self.requests.items()):
                lines.append(f'moon_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}')
            lines += [
                "# HELP moon_request_seconds Request latency by route.",
                "# TYPE moon_request_seconds histogram",
            ]
            for route in sorted(self.latency_count):
                for bound, n in zip(BUCKETS, self.latency_buckets[route], strict=True):
                    lines.append(f'moon_request_seconds_bucket{{route="{route}",le="{bound}"}} {n}')
                lines.append(f'moon_request_seconds_bucket{{route="{route}",le="+Inf"}} {self.latency_count[route]}')
                lines.append(f'moon_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
                lines.append(f'moon_request_seconds_count{{route="{route}"}} {self.latency_count[route]}')
            for name, value in sorted(self.gauges.items()):
                lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        lines += ["# TYPE moon_uptime_seconds gauge", f"moon_uptime_seconds {time.time() - self.started:.1f}"]
        return "\n".join(lines) + "\n"
