import random

import pytest
import torch
from fixed_heads import FixedHead, zero_features
from PIL import Image, ImageDraw

from moon.regions import LearnedDetector
from moon.regions.learned import BoxHead
from moon.regions.refine_window import crop_window, image_to_window, jitter_box, refine_window, window_to_image


def test_window_is_a_square_around_the_box_with_a_floor():
    assert refine_window((10, 20, 30, 60), (200, 100), context=2.0) == (-20.0, 0.0, 60.0, 80.0)
    # a 2-pixel box still gets a window of 15 % of the image's longer side
    x0, y0, x1, y1 = refine_window((99, 49, 101, 51), (200, 100), context=2.0)
    assert (x1 - x0, y1 - y0) == pytest.approx((30.0, 30.0)) and (x0 + x1) / 2 == 100 and (y0 + y1) / 2 == 50


def test_window_and_image_frames_are_exact_inverses():
    rng = random.Random(3)
    for _ in range(50):
        box = tuple(rng.uniform(-50, 300) for _ in range(4))
        win = refine_window(
            (rng.uniform(0, 100), rng.uniform(0, 100), rng.uniform(100, 200), rng.uniform(100, 200)), (224, 224), 2.5
        )
        assert window_to_image(image_to_window(box, win), win) == pytest.approx(box, abs=1e-9)
    assert window_to_image((0.25, 0.25, 0.75, 0.75), (0.0, 0.0, 40.0, 80.0)) == (10.0, 20.0, 30.0, 60.0)


def test_crop_shows_the_window_and_maps_back_to_the_object():
    im = Image.new("RGB", (200, 120), (255, 255, 255))
    ImageDraw.Draw(im).rectangle([60, 30, 99, 69], fill=(255, 0, 0))  # object = pixels [60, 100) × [30, 70)
    win = refine_window((60, 30, 100, 70), im.size, context=2.0)  # (40, 10, 120, 90): object in the middle half
    crop = crop_window(im, win, 160)
    assert crop.size == (160, 160)
    red = [(x, y) for y in range(160) for x in range(160) if crop.getpixel((x, y))[1] < 60]
    xs, ys = [p[0] for p in red], [p[1] for p in red]
    found = (min(xs) / 160, min(ys) / 160, (max(xs) + 1) / 160, (max(ys) + 1) / 160)
    assert window_to_image(found, win) == pytest.approx((60, 30, 100, 70), abs=1.0)


def test_window_outside_the_image_is_grey():
    crop = crop_window(Image.new("RGB", (50, 50), (0, 0, 0)), (-50, -50, 100, 100), 96)
    assert crop.getpixel((2, 2)) == (127, 127, 127) and crop.getpixel((48, 48)) == (0, 0, 0)


def test_jitter_is_seeded_and_zero_jitter_is_identity():
    box = (10.0, 20.0, 50.0, 40.0)
    assert jitter_box(box, random.Random(0)) == jitter_box(box, random.Random(0))
    assert jitter_box(box, random.Random(0), shift=0.0, scale=0.0) == pytest.approx(box)


def test_refined_box_is_the_window_box_mapped_back_exactly():
    first, refined = (0.25, 0.5, 0.5, 0.75), (0.3, 0.2, 0.9, 0.95)
    det = LearnedDetector(
        FixedHead(first),
        input_size=64,
        features=zero_features,
        refine=FixedHead(refined),
        refine_size=64,
        context=2.0,
    )
    im = Image.new("RGB", (200, 100))
    first_px = (50.0, 50.0, 100.0, 75.0)
    win = refine_window(first_px, im.size, 2.0)  # (25, 12.5, 125, 112.5)
    want = window_to_image(refined, win)
    (d,) = det.detect(im)
    assert d.box == pytest.approx((want[0], want[1], want[2], min(want[3], 100.0)))
    assert d.box[3] == 100.0  # clipped to the image


def test_refining_detector_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    det = LearnedDetector(BoxHead(width=8), input_size=64, refine=BoxHead(width=8), refine_size=96, context=2.5)
    det.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"detector.json", "head.safetensors", "refine.safetensors"}
    back = LearnedDetector.load(tmp_path / "m")
    assert (back.refine_size, back.context) == (96, 2.5)
    im = Image.new("RGB", (90, 70), (30, 140, 200))
    assert back.detect(im) == det.detect(im)
    assert back.fingerprint() != LearnedDetector(BoxHead(width=8), input_size=64).fingerprint()
