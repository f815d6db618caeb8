"""The generated store: determinism, boxes, splits, statistics, duplicates, queries."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon.data import ProductStore, StoreError
from moon.world import WorldParams, synthesize
from moon.world.synth import assign_split_modality


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_store_and_another_seed_does_not(tmp_path):
    a = synthesize(tmp_path / "a", n_products=10, seed=3, show_progress=False, workers=1)
    b = synthesize(tmp_path / "b", n_products=10, seed=3, show_progress=False, workers=2)
    c = synthesize(tmp_path / "c", n_products=10, seed=4, show_progress=False, workers=1)
    da, db, dc = _digest(a.root), _digest(b.root), _digest(c.root)
    assert da == db  # also: parallel rendering changes nothing
    assert "manifest.json" in da and "boxes.parquet" in da
    assert da["products.parquet"] != dc["products.parquet"]


def test_existing_store_is_refused_unless_overwrite(tmp_path):
    synthesize(tmp_path / "s", n_products=3, seed=0, show_progress=False, workers=1)
    with pytest.raises(StoreError, match="already exists"):
        synthesize(tmp_path / "s", n_products=3, seed=0, show_progress=False, workers=1)
    store = synthesize(tmp_path / "s", n_products=2, seed=1, show_progress=False, workers=1, overwrite=True)
    assert store.manifest["counts"]["products"] == 2
    images = {p.relative_to(store.root).as_posix() for p in (store.root / "images").rglob("*.jpg")}
    referenced = {b.image for b in store.iter_boxes()}
    assert images == referenced  # the old world's pictures are gone


def test_store_is_valid_and_counts_match(tiny_world):
    report = tiny_world.validate()
    assert report.ok, report.format()
    assert tiny_world.manifest["counts"]["products"] == tiny_world.manifest["created"]["params"]["n_products"] == 48
    created = tiny_world.manifest["created"]
    assert set(created) == {"tool", "version", "seed", "params"}  # nothing time-dependent


def test_every_image_has_one_true_box_inside_it(tiny_world):
    boxes = list(tiny_world.iter_boxes("truth"))
    per_image = Counter(b.image for b in boxes)
    listing_images = {
        Path(x).relative_to(tiny_world.root).as_posix() for p in tiny_world.iter_products() for x in p.images
    }
    query_images = {
        Path(x).relative_to(tiny_world.root).as_posix() for q in tiny_world.iter_queries() for x in q.images
    }
    assert set(per_image) == listing_images | query_images
    assert set(per_image.values()) == {1}
    kinds = Counter(b.kind for b in boxes)
    assert set(kinds) == {"clean", "scene", "banner", "detail", "query"}
    assert kinds["query"] == len(query_images)
    for b in boxes:
        with Image.open(tiny_world.path(b.image)) as im:
            w, h = im.size
        assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h, b
        assert (b.kind == "query") == (b.image in query_images)


def test_scene_products_are_small_and_clean_products_large(tiny_world):
    area = defaultdict(list)
    for b in tiny_world.iter_boxes("truth"):
        area[b.kind].append(b.area() / (224 * 224))
    assert max(area["scene"]) < 0.2  # the product is a small part of a scene shot
    assert np.median(area["clean"]) > 2 * np.median(area["scene"])
    assert np.median(area["detail"]) > 0.5  # zooms fill the picture


def test_stats_show_the_required_structure(tiny_world):
    st = tiny_world.stats()
    assert st["category_levels"] >= 4
    assert set(st["category_depth_histogram"]) == {"4"}
    assert len(st["attribute_types"]) >= 6
    ipp = st["images_per_product"]
    assert ipp["min"] >= 3 and ipp["max"] <= 6 and ipp["mean"] >= 3
    assert set(st["query_modality"]) == {"image", "text", "multimodal"}
    assert st["duplicate_listings"]["groups"] >= 1
    assert st["duplicate_listings"]["products"] >= 2 * st["duplicate_listings"]["groups"]


def test_splits_are_disjoint_and_held_out_leaves_only_in_test(tiny_world):
    queries = tiny_world.queries()
    ids = [q.id for q in queries]
    assert len(ids) == len(set(ids))  # each query in exactly one split
    split_of = {q.id: q.split for q in queries}
    held = set(tiny_world.manifest["created"]["params"]["held_out_leaves"])
    products = {p.id: p for p in tiny_world.iter_products()}
    bought_in = defaultdict(set)
    for pu in tiny_world.purchases():
        bought_in[split_of[pu.query_id]].add(pu.product_id)
    held_products = {pid for pid, p in products.items() if " > ".join(p.category) in held}
    assert held_products, "the tiny world should contain held-out leaves"
    assert not held_products & (bought_in["train"] | bought_in["val"])
    train_leaves = {tuple(products[pid].category) for pid in bought_in["train"]}
    assert not {tuple(products[pid].category) for pid in held_products} & train_leaves
    # some test products never appear in training purchases
    assert bought_in["test"] - bought_in["train"]


def test_train_modality_mix_is_12_3_2_and_eval_splits_have_every_modality():
    params = WorldParams()
    rng = np.random.default_rng(0)
    draws = [assign_split_modality(rng, params, held_out=False, cold=False) for _ in range(8000)]
    train = Counter(m for s, m in draws if s == "train")
    total = sum(train.values())
    for modality, share in (("image", 12 / 17), ("text", 3 / 17), ("multimodal", 2 / 17)):
        assert abs(train[modality] / total - share) < 0.025, (modality, train)
    evals = Counter(m for s, m in draws if s != "train")
    assert min(evals[m] for m in ("image", "text", "multimodal")) / sum(evals.values()) >= 0.15
    splits = Counter(s for s, _ in draws)
    assert abs(splits["train"] / len(draws) - 0.8) < 0.03
    assert {assign_split_modality(rng, params, held_out=True, cold=False)[0] for _ in range(50)} == {"test"}
    assert {assign_split_modality(rng, params, held_out=False, cold=True)[0] for _ in range(50)} == {"val", "test"}


def test_duplicate_listings_share_the_item_but_not_title_or_photos(tiny_world):
    groups = defaultdict(list)
    for p in tiny_world.iter_products():
        if p.group:
            groups[p.group].append(p)
    assert groups
    for members in groups.values():
        assert len(members) == 2
        a, b = members
        assert a.category == b.category and a.attributes == b.attributes
        assert a.title != b.title
        hashes_a = {hashlib.sha1(Path(x).read_bytes()).hexdigest() for x in a.images}
        hashes_b = {hashlib.sha1(Path(x).read_bytes()).hexdigest() for x in b.images}
        assert not hashes_a & hashes_b


def test_siblings_in_a_leaf_differ_by_colour_brand_or_pattern(tiny_world):
    by_leaf = defaultdict(list)
    for p in tiny_world.iter_products():
        by_leaf[tuple(p.category)].append(p)
    confusable = 0
    for members in by_leaf.values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                if a.group and a.group == b.group:
                    continue
                same = {k for k in a.attributes if a.attributes[k] == b.attributes.get(k)}
                if {"material", "style", "size", "pack"} <= same:
                    confusable += 1
                    assert a.attributes != b.attributes
    assert confusable >= 3  # hard negatives exist


def test_titles_name_only_some_attributes_and_queries_are_not_titles(tiny_world):
    products = tiny_world.products()
    titles = {p.title for p in products}
    named = []
    for p in products:
        values = [v[0].lower() for k, v in p.attributes.items() if k in ("color", "material", "pattern")]
        named.append(sum(v in p.title.lower() for v in values) / len(values))
    assert 0.1 < float(np.mean(named)) < 0.9
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in titles)  # some Chinese words
    texts = [q.text for q in tiny_world.iter_queries() if q.text]
    assert texts and not set(texts) & titles
    assert np.mean([len(t.split()) for t in texts]) < np.mean([len(t.split()) for t in titles]) / 2


def test_query_photos_are_new_renderings_not_listing_copies(tiny_world):
    listing = {hashlib.sha1(Path(x).read_bytes()).hexdigest() for p in tiny_world.iter_products() for x in p.images}
    photos = [x for q in tiny_world.iter_queries() for x in q.images]
    assert photos
    assert not {hashlib.sha1(Path(x).read_bytes()).hexdigest() for x in photos} & listing


def test_purchases_span_the_year_with_regions(tiny_world):
    purchases = tiny_world.purchases()
    ts = np.array([p.timestamp for p in purchases])
    assert ts.min() >= 1704067200 and ts.max() < 1704067200 + 366 * 86400
    assert ts.max() - ts.min() > 90 * 86400
    assert len({p.region for p in purchases}) >= 3
    positives = tiny_world.positives()
    assert set(positives) == {q.id for q in tiny_world.iter_queries()}


def test_popularity_has_a_long_tail(tiny_world):
    per_product = Counter(p.product_id for p in tiny_world.purchases())
    counts = sorted((per_product.get(pid, 0) for pid in tiny_world.product_ids()), reverse=True)
    top = sum(counts[: max(1, len(counts) // 5)])
    assert top / sum(counts) > 0.3  # the top fifth of products take well over a fifth of purchases
    assert 0 in counts


def test_store_reopens_with_product_store(tiny_world):
    store = ProductStore(tiny_world.root)
    p = store.product(store.product_ids()[0])
    assert len(p.category) == 4 and len(p.images) >= 3
    assert all(Path(x).is_file() for x in p.images)


def test_catalogue_is_planned_as_a_stream():
    """Planning 100,000 listings holds nothing per listing: the first ones come at once, lazily."""
    import itertools

    from moon.world.synth import _Catalog, _plan

    catalog = _Catalog(WorldParams(n_products=100_000), seed=0)
    plan = _plan(catalog, 0, 100_000)
    first = list(itertools.islice(plan, 50))
    assert [li.index for li in first] == list(range(50))
    assert all(len(li.model.category) == 4 for li in first)
    # duplicates follow their original, siblings share a family
    for a, b in itertools.pairwise(first):
        if b.group is not None and a.group == b.group:
            assert (a.family, a.v) == (b.family, b.v)


def test_world_code_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, moon.world, moon.world.gallery, moon.cli.data_world; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_size_attribute_sets_the_scale_of_the_clean_shot(tiny_world):
    clean = {b.image: b for b in tiny_world.iter_boxes("truth") if b.kind == "clean"}
    side = defaultdict(list)
    for p in tiny_world.iter_products():
        if p.attributes["pack"] == ["1 pc"]:
            b = clean[Path(p.images[0]).relative_to(tiny_world.root).as_posix()]
            side[p.attributes["size"][0]].append(max(b.x1 - b.x0, b.y1 - b.y0))
    present = [s for s in ("S", "M", "L", "XL") if side[s]]
    assert len(present) >= 2
    medians = [np.median(side[s]) for s in present]
    assert medians == sorted(medians)  # a bigger size is a bigger item in the main shot
