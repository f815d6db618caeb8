"""Every true box covers exactly the pixels the product changed, and nothing outside the image."""

from __future__ import annotations

import numpy as np
import pytest

from moon.world import shots
from moon.world.appearance import pattern_mask, product_layer
from moon.world.attributes import Variant
from moon.world.textures import TEXTURE_KINDS, texture


def _sprite(h: int = 90, w: int = 60) -> np.ndarray:
    """A soft-edged ellipse with a hole: a product footprint with anti-aliased alpha."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    alpha = np.clip((1.0 - r) * 600, 0, 255)
    alpha[(r < 0.05)] = 0
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., :3] = 120
    rgba[..., 3] = alpha.astype(np.uint8)
    return rgba


def _recoloured(layer: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    out = layer.copy()
    out[..., :3] = rgb
    return out


PHOTO = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
DISTRACTORS = [_sprite(40, 70), _sprite(70, 30)]


def _compose(kind: str, layer: np.ndarray, seed: int) -> shots.Shot:
    rng = np.random.default_rng(seed)
    if kind == "clean":
        return shots.clean_shot(layer, 0.7, rng)
    if kind == "scene":
        return shots.scene_shot(layer, [PHOTO], [], DISTRACTORS, rng, lookalike=_sprite(50, 50))
    if kind == "banner":
        return shots.banner_shot(layer, "Lucky Store", "$9.99", rng)
    if kind == "detail":
        return shots.detail_shot(layer, rng)
    return shots.query_photo(layer, [PHOTO], [], DISTRACTORS, rng)


@pytest.mark.parametrize("kind", ["clean", "scene", "banner", "detail", "query"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_is_the_tight_box_of_every_pixel_the_product_changed(kind, seed):
    variant = Variant("red", "striped", "wood", "M", "cute", "Zenko", "2 pcs")
    layer = product_layer(_sprite(), variant, np.random.default_rng(seed))
    # same alpha, two flat colours: the two renderings differ exactly where the product is opaque
    a = _compose(kind, _recoloured(layer, (255, 0, 255)), seed)
    b = _compose(kind, _recoloured(layer, (0, 255, 0)), seed)
    assert a.box == b.box and a.kind == kind
    diff = np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max(axis=2) > 24
    x0, y0, x1, y1 = a.box
    assert 0 <= x0 < x1 <= shots.SIDE and 0 <= y0 < y1 <= shots.SIDE
    assert diff.any()
    blur_margin = 4 if kind == "query" else 0  # the query photo is blurred after pasting
    inside = np.zeros_like(diff)
    inside[max(0, y0 - blur_margin) : y1 + blur_margin, max(0, x0 - blur_margin) : x1 + blur_margin] = True
    assert not (diff & ~inside).any(), "the product changed pixels outside its box"
    # tight: the footprint touches all four sides of the box
    foot = a.footprint
    assert foot[y0, x0:x1].any() and foot[y1 - 1, x0:x1].any()
    assert foot[y0:y1, x0].any() and foot[y0:y1, x1 - 1].any()
    assert shots.box_of(foot) == a.box


def test_box_of_known_mask():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert shots.box_of(mask) == (3, 2, 9, 5)
    with pytest.raises(ValueError):
        shots.box_of(np.zeros((4, 4), bool))


def test_item_hanging_off_the_edge_is_clipped():
    canvas = shots.Image.new("RGBA", (50, 40), (0, 0, 0, 255))
    item = shots.Image.new("RGBA", (30, 30), (255, 0, 0, 255))
    foot = shots._paste(canvas, item, 35, -10)
    assert shots.box_of(foot) == (35, 0, 50, 20)


def test_attributes_change_the_pixels():
    sprite = _sprite()
    base = Variant("red", "solid", "plastic", "M", "classic", "Zenko", "1 pc")
    ref = product_layer(sprite, base, np.random.default_rng(0))
    for change in (
        {"color": "blue"},
        {"pattern": "plaid"},
        {"material": "wood"},
        {"style": "vintage"},
        {"brand": "Aurora"},
    ):
        other = product_layer(sprite, Variant(**{**base.__dict__, **change}), np.random.default_rng(0))
        if other.shape == ref.shape:
            assert np.abs(other.astype(int) - ref.astype(int)).sum() > 1000, change
    two = product_layer(sprite, Variant(**{**base.__dict__, "pack": "2 pcs"}), np.random.default_rng(0))
    assert two.shape[1] > ref.shape[1]  # a 2-pack shows two items


def test_patterns_and_textures_are_well_formed():
    rng = np.random.default_rng(0)
    assert not pattern_mask(20, 20, "solid", rng).any()
    for name in ("striped", "polka dot", "plaid", "zigzag"):
        m = pattern_mask(40, 40, name, rng)
        assert 0.05 < m.mean() < 0.95, name
    for kind in TEXTURE_KINDS:
        t = texture(32, 48, kind, rng)
        assert t.shape == (32, 48, 3) and t.dtype == np.uint8 and t.std() > 0.5, kind
