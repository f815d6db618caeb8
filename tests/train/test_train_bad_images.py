"""Hardening round two, "nothing hangs": a bad file at an image path of the training store.

A named pipe (FIFO), a directory, a missing file or a dangling symbolic link where a product's image,
a crop or a query's image should be used to fail only at the step that drew its record — possibly
hours in — or block the reader on the FIFO. ``moon train`` now checks every image file the training
and validation data will read, one ``stat`` each, before anything is written and before the model is
built: one ``error: …`` line naming the first bad paths and how many there are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import toy_run_config  # the hardening tests' 6-step toy run
from PIL import Image

from moon.data import Box, Product, Purchase, Query, StoreWriter
from moon.train import load_config, loop
from moon.train.dataset import check_image_files, read_training_records


def _image_store(root: Path) -> Path:
    """The hardening tests' tiny store (8 leaves × 3 products), with one image per product, one per
    val query (multimodal, so only validation reads it) and truth crops of the c0 products' images."""
    with StoreWriter(root, created={"tool": "tests"}) as w:
        for c in range(8):
            for j in range(3):
                w.add_product(
                    Product(
                        f"c{c}p{j}",
                        f"thing {c} variant {j}",
                        images=[f"images/c{c}p{j}.png"],
                        category=["Ind", f"Leaf{c}"],
                    )
                )
            w.add_query(Query(f"q{c}", f"looking for thing {c}", split="train"))
            w.add_purchase(Purchase(f"q{c}", f"c{c}p0", c))
            w.add_query(Query(f"v{c}", f"thing {c} please", images=[f"images/v{c}.png"], split="val"))
            w.add_purchase(Purchase(f"v{c}", f"c{c}p1", 100 + c))
            w.add_purchase(Purchase(f"v{c}", f"c{(c + 3) % 8}p2", 200 + c))
        for j in range(3):
            w.add_box(Box(f"images/c0p{j}.png", 0, 0, 4, 4, source="truth", crop=f"crops/c0p{j}.png"))
    for folder in ("images", "crops"):
        (root / folder).mkdir(exist_ok=True)
    for i, name in enumerate(
        [f"images/c{c}p{j}.png" for c in range(8) for j in range(3)]
        + [f"images/v{c}.png" for c in range(8)]
        + [f"crops/c0p{j}.png" for j in range(3)]
    ):
        Image.new("RGB", (8, 8), (i * 7 % 256, 40, 90)).save(root / name)
    return root


@pytest.fixture
def store(tmp_path) -> Path:
    return _image_store(tmp_path / "store")


def _config(store: Path, tmp_path: Path, **data) -> tuple[Path, Path]:
    run = tmp_path / "run"
    cfg = toy_run_config(store, run)
    if data:
        raw = cfg.to_dict()
        raw["data"].update(data)
        cfg = load_config(extra=raw)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    return config_file, run


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if ``moon train`` gets as far as building the model."""

    def build_trainable(*args, **kwargs):
        raise AssertionError("the model was built before the image files were checked")

    monkeypatch.setattr(loop, "build_trainable", build_trainable)


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling-symlink":
        path.symlink_to(path.with_name("gone.png"))
    else:
        assert kind == "missing"


REASONS = {  # what follows the path in the error line
    "fifo": ": is a named pipe (FIFO), not an image",
    "directory": ": is a directory, not an image",
    "missing": ": file not found",
    "dangling-symlink": ": a dangling symbolic link (to ",
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("kind", list(REASONS))
def test_bad_file_at_a_product_image_is_one_line_before_any_model_work(
    kind, store, tmp_path, within, one_line_cli_error, no_model_work
):
    bad = store / "images" / "c5p2.png"
    _replace(bad, kind)
    config_file, run = _config(store, tmp_path)

    line = within(20, lambda: one_line_cli_error(["train", "--config", str(config_file)]), bad)

    assert f"{bad}{REASONS[kind]}" in line, line
    assert "1 of the 32 image files that training would read is not a readable image file" in line, line
    assert "Nothing was trained" in line, line
    assert not run.exists()  # nothing written: no run directory, no checkpoint


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_fifo_at_a_val_query_image_never_hangs_and_is_named(store, tmp_path, within, one_line_cli_error, no_model_work):
    """Only validation reads a val query's image: without the check the FIFO would block the reader
    at the first validation, after the first steps were trained and checkpointed."""
    fifo = store / "images" / "v6.png"
    _replace(fifo, "fifo")
    config_file, run = _config(store, tmp_path)
    line = within(20, lambda: one_line_cli_error(["train", "--config", str(config_file)]), fifo)
    assert f"{fifo}: is a named pipe (FIFO), not an image" in line, line
    assert not (run / "checkpoints").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_fifo_at_a_crop_is_checked_when_training_reads_crops(
    store, tmp_path, within, one_line_cli_error, no_model_work
):
    fifo = store / "crops" / "c0p1.png"
    _replace(fifo, "fifo")
    config_file, run = _config(store, tmp_path, crop_source="truth")
    line = within(20, lambda: one_line_cli_error(["train", "--config", str(config_file)]), fifo)
    assert f"{fifo}: is a named pipe (FIFO), not an image" in line, line
    assert "1 of the 35 image files" in line, line
    assert not run.exists()


def test_many_bad_images_name_the_first_three_and_count_all(store, tmp_path, one_line_cli_error, no_model_work):
    for c in range(8):
        _replace(store / "images" / f"c{c}p0.png", "missing")
    (store / "images" / "c2p1.png").unlink()
    (store / "images" / "c2p1.png").mkdir()
    config_file, run = _config(store, tmp_path)
    line = one_line_cli_error(["train", "--config", str(config_file)])
    assert "9 of the 32 image files that training would read are not a readable image file: " in line, line
    assert f"{store / 'images' / 'c0p0.png'}: file not found; " in line, line
    assert f"{store / 'images' / 'c1p0.png'}: file not found; " in line, line
    assert f"{store / 'images' / 'c2p0.png'}: file not found; … and 6 more. " in line, line
    assert str(store / "images" / "c3p0.png") not in line
    assert not run.exists()


def test_a_good_store_trains_and_the_check_is_one_stat_per_file(store, tmp_path):
    """The check passes on good files (a symlink to a regular file is fine) and stays cheap: one
    ``stat`` per distinct file, nothing opened (5,000 files, each named twice, in well under 2 s)."""
    (store / "images" / "c4p1.png").rename(store / "elsewhere.png")
    (store / "images" / "c4p1.png").symlink_to(store / "elsewhere.png")
    records = read_training_records(store)
    assert check_image_files(store, [*records.products, *records.val_queries]) == 32

    (store / "many").mkdir()
    for i in range(5_000):
        os.link(store / "elsewhere.png", store / "many" / f"{i}.png")
    many = [Product(f"x{i}", images=[str(store / "many" / f"{i}.png")] * 2) for i in range(5_000)]
    t0 = time.perf_counter()
    assert check_image_files(store, many) == 5_000
    assert time.perf_counter() - t0 < 2.0

    cfg = toy_run_config(store, tmp_path / "run")
    loop.train(cfg)
    assert (tmp_path / "run" / "final").is_dir()
