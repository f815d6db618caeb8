"""Real sources: curation, Fashion-MNIST decoding, and actionable errors when a package is missing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moon.errors import MoonError
from moon.world.sources import SpriteCache, WorldSourceError, clipart_models, fashion_mnist, fashion_sprite
from moon.world.taxonomy import NOUN_PATHS, TOKEN_ALIASES, noun_of_tokens


def test_curated_drawings_are_products_with_four_level_paths():
    models = clipart_models()
    assert len(models) > 300
    nouns = Counter(m.noun for m in models)
    assert len(nouns) > 100
    industries = {m.category[0] for m in models}
    assert {"Food & Drink", "Electronics", "Toys & Hobbies", "Tools", "Office", "Home & Garden"} <= industries
    for m in models:
        assert len(m.category) == 4 and m.category[-1].lower() == m.noun
        parts = set(Path(m.path).parts)
        assert not parts & {"icons", "buttons", "signs_and_symbols", "shapes", "flags", "logos", "people"}
        assert "bw" not in Path(m.path).stem.split("_")
    assert len({Path(m.path).name for m in models}) == len(models)  # no file twice
    names = {Path(m.path).name for m in models}
    assert len(names & {"balloon-red-aj.png", "balloon-blue-aj.png", "balloon-green-aj.png"}) <= 1  # colour copies


def test_aliases_point_at_known_leaves_and_two_word_nouns_win():
    assert set(TOKEN_ALIASES.values()) <= set(NOUN_PATHS)
    assert noun_of_tokens(["magnifying", "glass", "01"]) == "magnifying glass"
    assert noun_of_tokens(["sedia", "architetto"]) == "chair"
    assert noun_of_tokens(["ganson"]) is None


def test_sprite_cache_is_bounded_and_trims_to_content():
    paths = [m.path for m in clipart_models()[:5]]
    cache = SpriteCache(max_items=3)
    for p in paths:
        arr = cache.get(p)
        assert arr.ndim == 3 and arr.shape[2] == 4 and max(arr.shape[:2]) <= 256
        assert arr[0, :, 3].any() and arr[:, 0, 3].any()  # trimmed: content touches the edges
    assert len(cache) == 3
    assert cache.get(paths[-1]) is cache.get(paths[-1])


def test_fashion_mnist_decodes_to_ten_classes():
    images, labels = fashion_mnist()
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert set(np.unique(labels).tolist()) == set(range(10))
    sprite = fashion_sprite(images[0])
    assert sprite.shape[2] == 4 and sprite[..., 3].max() == 255 and (sprite[..., 3] == 0).any()


def test_missing_debian_data_names_the_apt_command(tmp_path):
    with pytest.raises(WorldSourceError, match="apt-get install -y openclipart-png"):
        clipart_models(str(tmp_path / "nope"))
    with pytest.raises(WorldSourceError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path / "nope"))
    assert issubclass(WorldSourceError, MoonError)
