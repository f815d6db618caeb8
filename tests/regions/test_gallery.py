import pytest
from PIL import Image

from moon.errors import ConfigError
from moon.regions import SaliencyDetector, write_gallery


def test_png_and_html_galleries(tiny_store, tmp_path):
    png = write_gallery(tiny_store.root, SaliencyDetector(), tmp_path / "g.png", n_per_kind=2, split=None, columns=3)
    sheet = Image.open(png)
    assert sheet.size == (3 * (224 + 8), 2 * (224 + 24))  # 3 kinds × 2 images → 6 tiles on 2 rows
    page = write_gallery(tiny_store.root, SaliencyDetector(), tmp_path / "g.html", n_per_kind=1, split=None)
    text = page.read_text(encoding="utf-8")
    assert text.count("<figure>") == 3 and "IoU" in text


def test_gallery_refuses_other_formats(tiny_store, tmp_path):
    with pytest.raises(ConfigError):
        write_gallery(tiny_store.root, SaliencyDetector(), tmp_path / "g.gif")
