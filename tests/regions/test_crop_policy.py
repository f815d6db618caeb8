import pytest
from PIL import Image

from moon.errors import ConfigError
from moon.regions import CropCache, CropPolicy, Detection, crop_image, crop_key


def test_pad_grows_box_and_clips_to_image():
    policy = CropPolicy(pad=0.1)
    assert policy.pad_box((10, 10, 30, 50), (100, 100)) == pytest.approx((8, 6, 32, 54))
    assert policy.pad_box((0, 0, 50, 50), (100, 100)) == pytest.approx((0, 0, 55, 55))


def test_choose_pads_and_rounds_outwards():
    box = CropPolicy(pad=0.1).choose([Detection((10.5, 10.5, 30.2, 50.0))], (100, 100))
    assert box == (8.0, 6.0, 33.0, 54.0)


def test_whole_image_and_tiny_boxes_fall_back_to_full_image():
    policy = CropPolicy(pad=0.05, max_area=0.85, min_area=0.01, min_side=8)
    assert policy.choose([Detection((1, 1, 99, 99))], (100, 100)) is None
    assert policy.choose([Detection((10, 10, 15, 60))], (100, 100)) is None  # 5 px wide
    assert policy.choose([Detection((10, 10, 18, 18))], (100, 100)) is None  # 0.64 % of the image
    assert policy.choose([], (100, 100)) is None
    assert policy.choose([Detection((20, 20, 60, 60))], (100, 100)) is not None


def test_low_scores_are_skipped_in_favour_of_the_next():
    policy = CropPolicy(pad=0.0, min_score=0.5)
    dets = [Detection((0, 0, 10, 10), 0.1), Detection((20, 20, 60, 60), 0.9)]
    assert policy.choose(dets, (100, 100)) == (20.0, 20.0, 60.0, 60.0)


def test_bad_policy_values_are_config_errors():
    with pytest.raises(ConfigError):
        CropPolicy(pad=-0.1)
    with pytest.raises(ConfigError):
        CropPolicy(min_area=0.9, max_area=0.5)


def test_crop_cache_round_trip_and_keys(tmp_path):
    policy = CropPolicy()
    k1 = crop_key("abc", "det1", policy)
    assert k1 == crop_key("abc", "det1", CropPolicy())
    assert k1 != crop_key("abc", "det2", policy)
    assert k1 != crop_key("abd", "det1", policy)
    assert k1 != crop_key("abc", "det1", CropPolicy(pad=0.2))
    cache = CropCache(tmp_path)
    assert cache.get(k1) is None
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    crop = crop_image(image, (5, 5, 25, 35))
    assert crop.size == (20, 30)
    cache.put(k1, (6, 6, 24, 34), 0.7, (5, 5, 25, 35), crop)
    got = cache.get(k1)
    assert got.box == (6, 6, 24, 34) and got.crop_box == (5, 5, 25, 35) and got.score == pytest.approx(0.7)
    assert got.crop_path.is_file()
    k2 = crop_key("full", "det1", policy)
    cache.put(k2, (0, 0, 50, 40), 0.0, None, None)
    assert cache.get(k2).crop_path is None
