"""Refining-pass options: several rounds, the mirrored-window average, and their persistence."""

import pytest
import torch
from fixed_heads import FixedHead, zero_features
from PIL import Image

from moon.errors import ConfigError
from moon.regions import LearnedDetector
from moon.regions.learned import BoxHead, unflip_boxes
from moon.regions.refine_window import refine_window, window_to_image

FIRST, REFINED = (0.25, 0.5, 0.5, 0.75), (0.3, 0.25, 0.8, 0.7)


def _detector(**kw) -> LearnedDetector:
    return LearnedDetector(
        FixedHead(FIRST),
        input_size=64,
        features=zero_features,
        refine=FixedHead(kw.pop("refined", REFINED)),
        refine_size=64,
        context=1.5,
        **kw,
    )


def test_unflip_is_an_involution_with_a_known_answer():
    b = torch.tensor([[0.1, 0.2, 0.4, 0.9], [0.5, 0.0, 1.0, 0.5]])
    assert torch.allclose(unflip_boxes(b), torch.tensor([[0.6, 0.2, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5]]))
    assert torch.allclose(unflip_boxes(unflip_boxes(b)), b)


def test_each_round_re_centres_the_window_on_the_previous_box():
    im = Image.new("RGB", (400, 200))
    box = (100.0, 100.0, 200.0, 150.0)  # FIRST in pixels
    for _ in range(3):
        box = window_to_image(REFINED, refine_window(box, im.size, 1.5))
        box = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], 400.0), min(box[3], 200.0))
    (d,) = _detector(refine_rounds=3).detect(im)
    assert d.box == pytest.approx(box)
    (one,) = _detector().detect(im)
    assert one.box != pytest.approx(box)


def test_flip_averages_the_box_with_the_mirrored_windows_box():
    im = Image.new("RGB", (400, 200))
    win = refine_window((100.0, 100.0, 200.0, 150.0), im.size, 1.5)
    x0, y0, x1, y1 = REFINED
    averaged = ((x0 + 1 - x1) / 2, y0, (x1 + 1 - x0) / 2, y1)
    (d,) = _detector(refine_flip=True).detect(im)
    assert d.box == pytest.approx(window_to_image(averaged, win))
    # a box symmetric about the window's vertical axis is unchanged by the mirrored average
    sym = (0.2, 0.1, 0.8, 0.6)
    (a,) = _detector(refined=sym, refine_flip=True).detect(im)
    (b,) = _detector(refined=sym).detect(im)
    assert a.box == pytest.approx(b.box)


def test_rounds_and_flip_round_trip_and_change_the_fingerprint(tmp_path):
    torch.manual_seed(0)
    head, refine = BoxHead(width=8), BoxHead(width=8)
    plain = LearnedDetector(head, input_size=64, refine=refine, refine_size=64)
    tuned = LearnedDetector(head, input_size=64, refine=refine, refine_size=64, refine_rounds=2, refine_flip=True)
    tuned.save(tmp_path / "m")
    back = LearnedDetector.load(tmp_path / "m")
    assert (back.refine_rounds, back.refine_flip) == (2, True)
    im = Image.new("RGB", (90, 70), (200, 140, 30))
    assert back.detect(im) == tuned.detect(im)
    assert plain.fingerprint() != tuned.fingerprint()
    plain.save(tmp_path / "p")
    assert LearnedDetector.load(tmp_path / "p").fingerprint() != back.fingerprint()


def test_zero_rounds_is_a_config_error():
    with pytest.raises(ConfigError, match="rounds"):
        _detector(refine_rounds=0)
