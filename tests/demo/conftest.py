"""A tiny finished demo, laid out exactly as ``moon demo`` lays it out, built once per session."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

#: stands in for moon-smol: the same graft family, random and tiny, no asset needed
TINY_SPEC = "moon-graft-tiny"


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """``<tmp>/demo-out``: :func:`moon.demo.run_demo` on a 40-product world with the demo's own MOON
    run (its name, hence its stage paths, its crops and its training overrides) on ``moon-graft-tiny``,
    a 1-epoch detector, 3 training steps and the demo's evaluation sample size."""
    import torch

    from moon.demo import DemoConfig, run_demo
    from moon.demo.pipeline import default_models

    moon = replace(default_models()[0], spec=TINY_SPEC)
    cfg = DemoConfig(
        products=40,
        detector_epochs=1,
        detector_max_images=40,
        steps=3,
        batch_size=4,
        queue_size=8,
        models=[moon],
    )
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the commands under test run with OMP_NUM_THREADS=1 too
    try:
        run_demo(out, cfg, log=lambda message: None)
    finally:
        torch.set_num_threads(before)
    return out
