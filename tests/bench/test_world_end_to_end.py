"""Every baseline through the whole harness on a generated product world (slow: builds a world)."""

import json

import pytest

from moon.bench import evaluate, write_comparison, write_results
from moon.model.graft import FEATURE_CACHE
from moon.models import load_embedder

world = pytest.importorskip("moon.world")

BASELINES = {
    "random": {},
    # reduced sizes keep the test bounded on 2 shared cores; the defaults run the same code
    "dual-encoder": {"layers": 1, "hidden": 64, "heads": 2, "image_size": 64, "max_images": 2},
    "pretrained-towers": {"image_size": 64, "max_images": 2},
}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "store"
    world.synthesize(out, n_products=30, seed=3, show_progress=False)
    return out


@pytest.mark.slow
def test_all_baselines_end_to_end_on_a_world(world_dir, tmp_path):
    from moon.data import ProductStore

    store = ProductStore(world_dir, crop_source="truth")
    dirs = []
    for spec, overrides in BASELINES.items():
        model = load_embedder(spec, overrides=overrides)
        result = evaluate(model, store, split="test")
        names = {t.spec.name for t in result.tasks}
        assert {"text2product", "image2product", "multimodal2product", "product2product"} <= names
        assert any(n.startswith("classification-l") for n in names) and any(n.startswith("attribute-") for n in names)
        for t in result.tasks:
            assert t.n_queries > 0, (spec, t.spec.name)
            assert all(v is not None and 0.0 <= v <= 1.0 for v in t.metrics.values()), (spec, t.spec.name)
        write_results(result, tmp_path / spec, plots=spec == "random")
        dirs.append(tmp_path / spec)
    assert FEATURE_CACHE.entries  # the frozen tower features were cached for reuse
    out = write_comparison(dirs, tmp_path / "compare.json")
    table = json.loads(out.read_text())
    assert len(table) == 3 and all("product2product" in scores for scores in table.values())
