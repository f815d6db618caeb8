import pyarrow.parquet as pq
import pytest

from moon.data import ProductStore
from moon.regions import CropPolicy, SaliencyDetector, run_detection
from moon.regions.run import parts_dir


class Interrupt(Exception):
    pass


def _stop_after(n):
    def hook(i, image):
        if i + 1 >= n:
            raise Interrupt(image)

    return hook


def _boxes(root, source):
    t = pq.read_table(root / "boxes.parquet").to_pylist()
    return [r for r in t if r["source"] == source]


def test_run_writes_boxes_and_crops_the_embedder_can_read(tiny_store):
    report = run_detection(tiny_store.root, SaliencyDetector(), show_progress=False)
    assert report.images == 9 * 3 + 1
    assert report.skipped and report.skipped[0].startswith("images/broken.jpg")  # reported, not fatal
    assert report.cropped + report.full_image == report.boxes_written == report.images - 1
    assert not parts_dir(tiny_store.root, "saliency").exists()
    store = ProductStore(tiny_store.root, crop_source="saliency")
    assert store.validate().ok, store.validate().format()
    assert len(_boxes(store.root, "truth")) == 27  # other sources are kept
    products = store.products()
    n_crops = sum(len(p.crops) for p in products) + sum(len(q.crops) for q in store.queries())
    assert n_crops == report.cropped > 0
    for p in products:
        for c in p.crops:
            assert c.startswith(str(store.root)) and ProductStore(store.root).path(c).is_file()


def test_interrupted_run_resumes_to_the_same_result(tiny_store, tmp_path):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_store.root, twin)
    full = run_detection(twin, SaliencyDetector(), show_progress=False)

    with pytest.raises(Interrupt):
        run_detection(tiny_store.root, SaliencyDetector(), chunk_size=4, on_image=_stop_after(10), show_progress=False)
    pdir = parts_dir(tiny_store.root, "saliency")
    assert len(list(pdir.glob("part-*.parquet"))) == 2  # two whole chunks of 4 survived
    resumed = run_detection(tiny_store.root, SaliencyDetector(), chunk_size=4, show_progress=False)
    assert resumed.resumed == 8
    assert resumed.cache_hits >= 1  # the 9th and 10th images were cropped before the kill: reused, not redone
    assert _boxes(tiny_store.root, "saliency") == _boxes(twin, "saliency")
    assert resumed.boxes_written == full.boxes_written
    # a second complete run replaces the boxes rather than appending
    run_detection(tiny_store.root, SaliencyDetector(), show_progress=False)
    assert len(_boxes(tiny_store.root, "saliency")) == full.boxes_written


def test_policy_change_discards_stale_parts(tiny_store):
    with pytest.raises(Interrupt):
        run_detection(tiny_store.root, SaliencyDetector(), chunk_size=2, on_image=_stop_after(4), show_progress=False)
    report = run_detection(tiny_store.root, SaliencyDetector(), policy=CropPolicy(pad=0.2), show_progress=False)
    assert report.resumed == 0


def test_a_batching_detector_sees_images_in_batches_with_the_same_boxes(tiny_store, tmp_path):
    import shutil

    import torch

    from moon.regions.learned import BoxHead, LearnedDetector

    torch.manual_seed(0)
    head = BoxHead(width=8)

    class Counting(LearnedDetector):
        calls: list[int] = []

        def detect_batch(self, images):
            type(self).calls.append(len(images))
            return super().detect_batch(images)

    twin = tmp_path / "twin"
    shutil.copytree(tiny_store.root, twin)
    run_detection(tiny_store.root, Counting(head, input_size=64), batch_size=8, show_progress=False)
    batched = list(Counting.calls)
    Counting.calls.clear()
    run_detection(twin, Counting(head, input_size=64), batch_size=1, show_progress=False)
    assert max(batched) == 8 and len(batched) < len(Counting.calls)  # 27 readable images: 4 calls, not 27
    a, b = _boxes(tiny_store.root, "learned"), _boxes(twin, "learned")
    assert [r["image"] for r in a] == [r["image"] for r in b]
    # the same boxes whether an image was detected alone or in a batch (equal here; on CPUs whose
    # kernels depend on the batch size, up to the features' rounding: a box fraction in bfloat16 has
    # 8 significant bits, so two units in the last place are 2^-7 of the image side)
    from PIL import Image

    for ra, rb in zip(a, b, strict=True):
        with Image.open(tiny_store.root / ra["image"]) as im:
            tol = 2**-7 * max(im.size)
        for k in ("x0", "y0", "x1", "y1"):
            assert abs(ra[k] - rb[k]) <= tol, (ra, rb)
