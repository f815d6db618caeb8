"""benchmarks/serve_soak.py: the summary's arithmetic on known series (no server, no timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("serve_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_of_a_linear_leak_and_a_steady_rate(soak):
    # RSS 100 MiB + 2 MiB per minute after a jump during warm-up; 10 requests answered per second
    samples = [
        {"t_s": t, "rss_mib": (50.0 if t < 60 else 100.0 + 2.0 * (t - 60) / 60), "answered": 10 * t}
        for t in range(0, 301, 5)
    ]
    s = soak.summarise(samples, warmup_s=60)
    assert (s["rss_start_mib"], s["rss_end_mib"], s["growth_mib"]) == (100.0, 108.0, 8.0)
    assert s["slope_mib_per_min"] == pytest.approx(2.0)
    assert [m["rps"] for m in s["rps_per_minute"]] == [10.0] * 5


def test_summary_without_samples_after_warmup_has_no_slope(soak):
    s = soak.summarise([{"t_s": 5, "rss_mib": 10.0, "answered": 3}], warmup_s=60)
    assert "slope_mib_per_min" not in s and s["rps_per_minute"] == [{"until_s": 5, "rps": 0.6}]
