import torch

from moon.data import ProductStore
from moon.regions import LearnedDetector, train_learned
from moon.regions.samples import iter_samples


def test_split_is_deterministic_and_query_images_follow_their_query(tiny_store):
    a = list(iter_samples(tiny_store))
    assert a == list(iter_samples(ProductStore(tiny_store.root)))
    queries = {q.images[0].split("/store/")[1]: q.split for q in tiny_store.queries()}
    for s in a:
        if s.image in queries:
            assert s.split == queries[s.image] and s.kind == "query"
    # the two images of one product always share a split
    by_product: dict[str, set[str]] = {}
    for s in a:
        if s.image.startswith("images/p"):
            by_product.setdefault(s.image.split("_")[0], set()).add(s.split)
    assert all(len(v) == 1 for v in by_product.values())
    assert {s.split for s in a} >= {"train", "test"}


def test_train_writes_a_loadable_detector_trained_on_train_images_only(tiny_store, tmp_path):
    seen = []
    det, report = train_learned(
        tiny_store.root,
        tmp_path / "m",
        epochs=3,
        batch_size=8,
        show_progress=False,
        on_epoch=lambda epoch, loss: seen.append(loss),
    )
    assert len(seen) == 3
    train_images = [s for s in iter_samples(tiny_store) if s.split == "train" and s.truth is not None]
    assert sum(report.images.values()) == len(train_images)
    loaded = LearnedDetector.load(tmp_path / "m")
    assert loaded.meta["train_images"] == report.images
    from moon.data import load_image

    im = load_image(tiny_store.root / "images" / "p0_scene.jpg")
    assert loaded.detect(im) == det.detect(im)


def test_refining_pass_is_saved_and_can_be_left_out(tiny_store, tmp_path):
    det, report = train_learned(tiny_store.root, tmp_path / "two", epochs=1, batch_size=8, show_progress=False)
    assert det.refine is not None and (tmp_path / "two" / "refine.safetensors").is_file()
    assert LearnedDetector.load(tmp_path / "two").refine is not None
    assert 0.0 <= report.val_iou <= 1.0 and 0.0 <= report.val_iou_first <= 1.0
    one, _ = train_learned(tiny_store.root, tmp_path / "one", epochs=1, batch_size=8, refine=False, show_progress=False)
    assert one.refine is None and not (tmp_path / "one" / "refine.safetensors").exists()
    assert LearnedDetector.load(tmp_path / "one").refine is None


def test_refine_draws_give_that_many_windows_per_image_and_set_refine_epochs(tiny_store, tmp_path):
    import random

    from moon.regions.backbone import LiteFeatures
    from moon.regions.training import TrainReport, _features

    samples = [s for s in iter_samples(tiny_store) if s.split == "train" and s.truth is not None][:4]
    first, second = _features(
        LiteFeatures(), tiny_store, samples, 64, 8, False, TrainReport(), (64, 1.5, random.Random(0)), draws=3
    )
    f1, _ = first.tensors()
    f2, t2 = second.tensors()
    assert f2.shape[0] == 3 * f1.shape[0] == 12
    assert bool((t2 >= 0).all() and (t2 <= 1).all())
    assert not torch.equal(t2[0], t2[1])  # each draw jitters its own window
    det, _ = train_learned(tiny_store.root, tmp_path / "m", epochs=3, refine_draws=2, show_progress=False, batch_size=8)
    assert det.meta["refine_draws"] == 2 and det.meta["refine_epochs"] == 2  # ceil(3 / 2)


def test_bf16_trunk_stays_close_to_float32():
    from moon.regions.backbone import LiteFeatures

    x = torch.randn(2, 3, 64, 64)
    exact, fast = LiteFeatures(stride8=True, bf16=False), LiteFeatures(stride8=True, bf16=True)
    a, b = exact(x), fast(x)
    assert b.dtype == torch.float32 and b.shape == a.shape == (2, 592, 4, 4)
    assert float((a - b).norm() / a.norm()) < 0.05


def test_fp32_can_be_forced(monkeypatch):
    from moon.regions.backbone import native_bf16

    monkeypatch.setenv("MOON_DETECT_FP32", "1")
    assert native_bf16() is False
