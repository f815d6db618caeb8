import pytest
import torch

from moon.errors import ConfigError
from moon.regions import LearnedDetector, load_detector
from moon.regions.learned import BoxHead, center_target, decode, giou_loss, head_loss


def test_giou_known_answers():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert float(giou_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = torch.tensor([[0.5, 0.0, 1.0, 0.5]])  # touching, hull = 2 × union → GIoU = 0
    assert float(giou_loss(a, b)) == pytest.approx(1.0, abs=1e-5)
    c = torch.tensor([[0.75, 0.0, 1.0, 0.5]])  # apart: union 0.375, hull 0.5 → GIoU = -0.25
    assert float(giou_loss(a, c)) == pytest.approx(1.25, abs=1e-5)


def test_center_target_peaks_at_box_centre():
    t = center_target(torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0]]), 8)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert int(t[0].argmax()) in (0, 1, 8, 9)  # around cell (1, 1) at centre 0.125
    r, c = divmod(int(t[1].argmax()), 8)
    assert r in (5, 6) and c in (5, 6)


def test_head_shapes_and_decode():
    head = BoxHead(in_channels=12, width=8)
    logits, boxes = head(torch.randn(3, 12, 5, 5))
    assert logits.shape == (3, 25) and boxes.shape == (3, 25, 4)
    assert bool((boxes[..., 2] > boxes[..., 0]).all()) and bool((boxes[..., 3] > boxes[..., 1]).all())
    box, score = decode(logits, boxes)
    assert box.shape == (3, 4) and score.shape == (3,)


def test_head_fits_a_fixed_batch():
    torch.manual_seed(0)
    head = BoxHead(in_channels=6, width=16)
    feats = torch.randn(16, 6, 4, 4)
    target = torch.rand(16, 2) * 0.4
    target = torch.cat([target, target + 0.3 + torch.rand(16, 2) * 0.2], dim=1)
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    first = None
    for _ in range(60):
        loss, _ = head_loss(*head(feats), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_save_load_round_trip_gives_same_boxes(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    det = LearnedDetector(BoxHead(width=8), input_size=64)
    det.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"detector.json", "head.safetensors"}
    back = load_detector("learned", tmp_path / "m")
    im = Image.new("RGB", (80, 60), (120, 40, 200))
    assert back.detect(im) == det.detect(im)
    x0, y0, x1, y1 = back.detect(im)[0].box
    assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 60
    assert back.fingerprint() == LearnedDetector.load(tmp_path / "m").fingerprint()


def test_missing_model_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="detector.json"):
        LearnedDetector.load(tmp_path)
    with pytest.raises(ConfigError):
        load_detector("learned", None)
    with pytest.raises(ConfigError):
        load_detector("yolo")
