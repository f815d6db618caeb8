"""The product world with bad input: out-of-range `moon data synth` options are one-line errors,
image files that are FIFOs or huge are refused (never waited on), and `overwrite` replaces an old
world only once the new one is complete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon.data import ProductStore
from moon.data.images import DEFAULT_MAX_BYTES, ImageLoadError
from moon.errors import ConfigError
from moon.world import synth as synth_module
from moon.world import synthesize, write_gallery
from moon.world.sources import SpriteCache, WorldSourceError, background_photos, clipart_models
from moon.world.taxonomy import PRODUCT_FOLDERS


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


# --------------------------------------------------------------------------- moon data synth options


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seed", "-1"], "--seed: must be in [0, 4,294,967,295], got -1"),
        (["--seed", str(2**32)], "--seed: must be in [0, 4,294,967,295], got 4,294,967,296"),
        (["--seed", str(10**30)], "--seed: must be in"),
        (["--products", "0"], "--products: must be in [1, 1,000,000], got 0"),
        (["--products", "-3"], "--products: must be in [1, 1,000,000], got -3"),
        (["--products", str(10**11)], "--products: must be in [1, 1,000,000], got 100,000,000,000"),
    ],
)
def test_out_of_range_synth_options_are_one_line_errors_before_any_work(
    tmp_path, args, needle, within, one_line_cli_error
):
    out = tmp_path / "store"
    line = within(30, lambda: one_line_cli_error(["data", "synth", "--out", str(out), "--quiet", *args]))
    assert needle in line
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"seed": -1}, "seed must be in"),
        ({"seed": 2**32}, "seed must be in"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"n_products": 0}, "n_products must be in"),
        ({"n_products": 10**9}, "n_products must be in"),
        ({"n_products": True}, "n_products must be a whole number"),
        ({"workers": 0}, "workers must be in"),
        ({"workers": 10**6}, "workers must be in"),
    ],
)
def test_out_of_range_synthesize_arguments_are_config_errors(tmp_path, kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        synthesize(tmp_path / "store", show_progress=False, **{"n_products": 3, **kwargs})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- image files that are not files


def _png(path: Path, size=(64, 48)) -> None:
    rgba = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    rgba[8:-8, 8:-8] = (200, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(path)


def test_a_fifo_or_huge_drawing_is_skipped_by_the_curation_not_waited_on(tmp_path, within):
    folder = tmp_path / "clipart" / PRODUCT_FOLDERS[0]
    folder.mkdir(parents=True)
    _png(folder / "apple.png")
    os.mkfifo(folder / "banana.png")
    _sparse(folder / "cherry.png", DEFAULT_MAX_BYTES + 1)
    models = within(20, lambda: clipart_models(str(tmp_path / "clipart")))
    assert [Path(m.path).name for m in models] == ["apple.png"]
    assert os.path.exists(folder / "banana.png")  # the FIFO is left alone


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_a_fifo_or_huge_sprite_is_a_one_line_error(tmp_path, kind, within):
    path = tmp_path / "sprite.png"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        _sparse(path, DEFAULT_MAX_BYTES + 1)
    cache = SpriteCache()
    with pytest.raises(WorldSourceError) as info:
        within(20, lambda: cache.get(str(path)))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert ("named pipe" if kind == "fifo" else "too large") in msg
    good = tmp_path / "good.png"
    _png(good)
    assert cache.get(str(good)).shape[2] == 4  # a good drawing still loads


def test_a_huge_background_photo_is_skipped_with_a_warning(tmp_path, within):
    darknet = tmp_path / "darknet"
    darknet.mkdir()
    _sparse(darknet / "dog.jpg", DEFAULT_MAX_BYTES + 1)
    os.mkfifo(darknet / "eagle.jpg")
    Image.new("RGB", (64, 64), (10, 120, 30)).save(darknet / "kite.jpg")
    with pytest.warns(UserWarning, match="dog.jpg: too large"):
        photos = within(20, lambda: background_photos(str(darknet)))
    names = {name for name, _ in photos}
    assert "darknet/kite.jpg" in names and not names & {"darknet/dog.jpg", "darknet/eagle.jpg"}


@pytest.fixture(scope="module")
def two_product_world(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("hw") / "store", n_products=2, seed=5, show_progress=False, workers=1)


def test_a_fifo_store_image_in_the_gallery_is_a_one_line_error(two_product_world, tmp_path, within, one_line_cli_error):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(two_product_world.root, store)
    first = next(iter(ProductStore(store).iter_products())).images[0]
    os.unlink(first)
    os.mkfifo(first)
    with pytest.raises(ImageLoadError) as info:
        within(20, lambda: write_gallery(store, tmp_path / "g.html"))
    assert "named pipe" in str(info.value) and "\n" not in str(info.value)
    line = within(20, lambda: one_line_cli_error(["data", "gallery", str(store), "--out", str(tmp_path / "g.png")]))
    assert "named pipe" in line and os.path.basename(first) in line
    assert not (tmp_path / "g.html").exists() and not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------------- overwrite keeps the old world


def test_a_failure_midway_through_overwrite_leaves_the_old_world_intact(tmp_path, monkeypatch):
    root = tmp_path / "store"
    synthesize(root, n_products=3, seed=0, show_progress=False, workers=1)
    (root / "notes.txt").write_text("mine")
    before = _digest(root)
    calls = {"n": 0}
    render = synth_module._World.render

    def failing_render(self, listing):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("disk full (simulated)")
        return render(self, listing)

    monkeypatch.setattr(synth_module._World, "render", failing_render)
    with pytest.raises(RuntimeError, match="simulated"):
        synthesize(root, n_products=5, seed=1, show_progress=False, workers=1, overwrite=True)
    assert calls["n"] == 3  # it failed after two new products were rendered
    assert _digest(root) == before  # every old file, byte for byte; nothing new
    store = ProductStore(root)
    assert store.validate().ok and store.manifest["counts"]["products"] == 3
    assert sorted(os.listdir(tmp_path)) == ["store"]  # no half-built world left next to it

    # Ctrl-C midway: the same
    def interrupted(self, listing):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth_module._World, "render", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(root, n_products=5, seed=1, show_progress=False, workers=1, overwrite=True)
    assert _digest(root) == before and sorted(os.listdir(tmp_path)) == ["store"]


def test_a_completed_overwrite_swaps_in_the_new_world_and_keeps_the_users_files(tmp_path):
    root = tmp_path / "store"
    synthesize(root, n_products=3, seed=0, show_progress=False, workers=1)
    (root / "notes.txt").write_text("mine")
    store = synthesize(root, n_products=2, seed=1, show_progress=False, workers=1, overwrite=True)
    fresh = synthesize(tmp_path / "fresh", n_products=2, seed=1, show_progress=False, workers=1)
    after = _digest(root)
    assert after.pop("notes.txt") == hashlib.sha1(b"mine").hexdigest()
    assert after == _digest(fresh.root)  # exactly the new world: no old image, table or manifest left
    assert store.validate().ok and store.manifest["counts"]["products"] == 2
    assert sorted(os.listdir(tmp_path)) == ["fresh", "store"]
