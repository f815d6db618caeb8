"""CPU check of benchmarks/moe_dispatch.py: behaviour, not timing.

A tiny run (moon-graft-tiny) writes its JSON and Markdown; every variant has a positive median time;
the tokens it routed add up to ``tokens × top_k``; the FLOP floor it states equals ``1 + top_k``
dense MLPs plus the router, worked out here from the layer's own sizes; the LM FLOP ratio of the
whole model lies between 1 and that floor (only some LM FLOPs are in MoE layers).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_dispatch.py"


def _load():
    spec = importlib.util.spec_from_file_location("moe_dispatch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_dispatch"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_variant_and_the_flop_floor(tmp_path):
    from moon.model import MoonEmbedder
    from moon.model.moe import moe_layers

    result = _load().main(
        ["--preset", "moon-graft-tiny", "--products", "8", "--batch", "4", "--train-batch", "4", "--repeats", "1",
         "--threads", "1", "--out", str(tmp_path / "world"), "--results-dir", str(tmp_path / "results"), "--tag", "t"]
    )  # fmt: skip
    written = json.loads((tmp_path / "results" / "moe_dispatch-t.json").read_text())
    assert written["layer"].keys() == result["layer"].keys() and len(written["layer"]) == 2
    md = (tmp_path / "results" / "moe_dispatch-t.md").read_text()
    assert "| encode batch (4 products) |" in md and "train step (fwd + bwd)" in md

    layer = moe_layers(MoonEmbedder.from_pretrained("moon-graft-tiny", device="cpu"))[0]
    hid, inter, k = layer.router.in_features, layer.shared.gate_proj.out_features, layer.top_k
    floor = ((1 + k) * 6 * hid * inter + 2 * hid * (len(layer.experts) + 1)) / (6 * hid * inter)
    for part in written["layer"].values():
        assert {"dense MLP", "MoE loop"} <= part["median_s"].keys()
        assert all(t > 0 for times in part["median_s"].values() for t in times.values())
        assert sum(part["routed_per_expert"]) == part["tokens"] * part["top_k"] > 0
        assert abs(part["flop_floor_ratio"] - floor) < 1e-12
    model = written["model"]
    assert all(v > 0 for d in model["median_s"].values() for v in d.values())
    for ratio in model["lm_flop_ratio_floor"].values():
        assert 1.0 < ratio <= floor
