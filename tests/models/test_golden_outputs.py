"""Golden outputs: the vectors of every buildable family's tiny, seeded model on fixed records, stored
in ``tests/models/golden/<name>.json`` and checked here, so a change that moves the numbers (a
refactor, a new fast path switched on by default, a dependency update) is caught, not discovered in
a benchmark weeks later.

Tolerance, from the arithmetic: float32 everywhere (MOON's ``precision`` is forced to ``fp32``), unit
vectors of ≤ 64 dimensions from ≤ 4 layers of width ≤ 256. A different CPU or BLAS build may add in a
different order; float32 rounding (ε ≈ 6e-8) over a few hundred additions per output, through a few
layers, stays below 1e-5 per coordinate, so 1e-4 leaves a tenfold margin and is still a thousand
times below what a real change gives (a changed position id moved ``moon-tiny``'s vectors by 7e-4, a
changed pooling by > 1e-2).

When a change is meant to move the numbers: ``MOON_WRITE_GOLDEN=1 pytest tests/models/test_golden_outputs.py``
rewrites the files; the diff then shows every family whose vectors moved, and the commit says why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon.data import Product, Query
from moon.models import load_embedder

GOLDEN = Path(__file__).parent / "golden"
ATOL = 1e-4
#: name → (spec, overrides): one tiny seeded model per buildable family, both MOON backbones
MODELS = {
    "moon-tiny": ("moon-tiny", {"precision": "fp32"}),
    "moon-graft-tiny": ("moon-graft-tiny", {"precision": "fp32"}),
    "moon-tiny-dense": ("moon-tiny", {"precision": "fp32", "moe_mode": "dense"}),
    "random": ("random:3", {}),
    "dual-encoder": (
        "dual-encoder",
        {"dim": 16, "hidden": 32, "layers": 1, "heads": 2, "image_size": 32, "patch": 16, "max_text_len": 16},
    ),
    "pretrained-towers": ("pretrained-towers", {"image_size": 64, "dim": 16}),
    "two-tower": ("two-tower:moon-graft-tiny", {}),
}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Fixed records: deterministic images (a colour field with a square of another colour), 1-3
    images per product, text-only and image-only ones, text, image and multimodal queries."""
    root = tmp_path_factory.mktemp("golden-images")

    def image(name: str, back: tuple[int, int, int], front: tuple[int, int, int], size: int) -> Path:
        arr = np.zeros((size, size, 3), dtype=np.uint8)
        arr[:] = back
        arr[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = front
        path = root / f"{name}.png"
        Image.fromarray(arr).save(path)
        return path

    red = image("red", (200, 30, 30), (250, 250, 250), 48)
    blue = image("blue", (30, 40, 210), (20, 20, 20), 64)
    green = image("green", (30, 180, 60), (240, 200, 0), 40)
    products = [
        Product("p0", "red leather ankle boot", [red], ["Fashion", "Shoes"], {"colour": "red"}),
        Product("p1", "blue ceramic coffee mug, 350 ml", [blue, green], ["Home", "Kitchen"]),
        Product("p2", "green garden hose with brass fittings", [green, red, blue], ["Garden"], {"length": "15 m"}),
        Product("p3", "usb-c charging cable", [], ["Electronics", "Cables"]),
        Product("p4", "", [blue], ["Home"]),
    ]
    queries = [
        Query("q0", text="red boots"),
        Query("q1", images=[blue]),
        Query("q2", text="garden hose", images=[green]),
    ]
    return products, queries


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vectors_equal_the_golden_file(name, records):
    products, queries = records
    spec, overrides = MODELS[name]
    emb = load_embedder(spec, overrides=overrides)
    got = {
        "products": emb.encode_products(products).astype(np.float64),
        "queries": emb.encode_queries(queries).astype(np.float64),
    }
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MOON_WRITE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        data = {"spec": spec, "overrides": overrides, **{k: np.round(v, 7).tolist() for k, v in got.items()}}
        path.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
        pytest.skip(f"wrote {path}")
    assert path.is_file(), f"{path} is missing: run MOON_WRITE_GOLDEN=1 pytest {__file__}"
    want = json.loads(path.read_text(encoding="utf-8"))
    assert (want["spec"], want["overrides"]) == (spec, overrides)
    for side, vectors in got.items():
        expected = np.asarray(want[side])
        assert vectors.shape == expected.shape, side
        worst = float(np.abs(vectors - expected).max())
        assert worst <= ATOL, f"{name} {side}: vectors moved by {worst:.2e} (> {ATOL:.0e}) from {path.name}"


def test_every_family_that_builds_from_nothing_has_a_golden_model():
    """A family added to the registry that builds a seeded model in code (``fresh``) and no golden
    file here fails."""
    from moon.models import families, get_family, parse_spec

    covered = {parse_spec(spec).family for spec, _ in MODELS.values()}
    fresh = {name for name in families() if get_family(name).fresh}
    assert fresh and fresh <= covered, fresh - covered
