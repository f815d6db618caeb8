import numpy as np
from PIL import Image, ImageDraw

from moon.data import box_iou
from moon.regions import Detection, SaliencyDetector
from moon.regions.saliency import saliency_map


def test_object_on_white_is_found_exactly():
    im = Image.new("RGB", (120, 90), (255, 255, 255))
    ImageDraw.Draw(im).rectangle([30, 20, 69, 59], fill=(200, 30, 30))
    dets = SaliencyDetector().detect(im, "red box")
    assert isinstance(dets[0], Detection)
    assert box_iou(dets[0].box, (30, 20, 70, 60)) > 0.85
    assert all(0.0 <= d.score <= 1.0 for d in dets)
    assert dets == sorted(dets, key=lambda d: -d.score)


def test_flat_image_falls_back_to_full_image():
    im = Image.new("RGB", (64, 48), (10, 200, 10))
    assert SaliencyDetector().detect(im)[0].box == (0.0, 0.0, 64.0, 48.0)


def test_map_is_normalised_and_deterministic():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8))
    a, b = saliency_map(im), saliency_map(im)
    assert np.array_equal(a, b)
    assert a.shape == (80, 128)  # long side resized to 128
    assert a.min() >= 0.0 and a.max() <= 1.0 + 1e-6


def test_fingerprint_depends_on_settings():
    assert SaliencyDetector().fingerprint() == SaliencyDetector().fingerprint()
    assert SaliencyDetector(size=64).fingerprint() != SaliencyDetector().fingerprint()


def test_tiny_store_eval_reports_bad_images_and_scores_the_rest(tiny_store):
    from moon.regions import evaluate_detector

    (tiny_store.root / "images" / "p1_clean.jpg").write_bytes(b"")  # an image with a true box, now empty
    report = evaluate_detector(tiny_store.root, SaliencyDetector(), split=None, show_progress=False)
    assert report.skipped == ["images/p1_clean.jpg: empty file (0 bytes)"]
    assert report.kinds["clean"].n == 8 and report.kinds["scene"].n == 9 and report.kinds["query"].n == 9
    assert report.kinds["all"].n == 26
    assert report.kinds["clean"].mean_iou > 0.8
    assert 0.0 <= report.kinds["scene"].hit_rate <= 1.0
