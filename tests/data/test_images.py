"""Safe image loading on real bad files made by the tests."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from moon.data import ImageLoadError, image_sha1, load_image


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_zero_bytes_file(tmp_path):
    f = tmp_path / "empty.jpg"
    f.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty.jpg: empty file"):
        load_image(f)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_truncated_jpeg(tmp_path):
    data = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)))
    f = tmp_path / "cut.jpg"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_image(f)
    assert err.value.reason.startswith("truncated")
    assert "cut.jpg" in str(err.value)


def test_text_file_named_jpg(tmp_path):
    f = tmp_path / "notes.jpg"
    f.write_text("this is not an image at all\n")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(f)


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG header declaring a huge size, with almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def test_huge_declared_size_is_refused_before_decoding(tmp_path):
    f = tmp_path / "bomb.png"
    f.write_bytes(_png_with_declared_size(100_000, 100_000))
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(f)


def test_pixel_limit_is_configurable():
    data = _png(Image.new("RGB", (100, 100)))
    assert load_image(data).size == (100, 100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(data, max_pixels=5_000)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    img = load_image(_jpeg(cmyk))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency_is_composited_on_white():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 255] + [0, 0, 0] * 255)  # index 0 = blue
    pal.putpixel((5, 5), 1)
    pal.info["transparency"] = 0  # index 0 transparent
    data = _png(pal, transparency=0)
    img = load_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent → white, not blue
    assert img.getpixel((5, 5)) == (0, 0, 0)


def test_rgba_and_la_are_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert load_image(_png(rgba)).getpixel((3, 3)) == (255, 255, 255)
    la = Image.new("LA", (10, 10), (0, 255))
    assert load_image(_png(la)).getpixel((3, 3)) == (0, 0, 0)


def test_16bit_png_is_scaled_to_8bit():
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    arr[1, 1] = 32768
    img16 = Image.fromarray(arr)
    assert img16.mode.startswith("I;16")
    img = load_image(_png(img16))
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert 120 <= img.getpixel((1, 1))[0] <= 135


def test_exif_orientation_is_applied():
    base = Image.new("RGB", (40, 20), (0, 0, 0))
    base.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img = load_image(_jpeg(base, exif=exif.tobytes(), quality=95))
    assert img.size == (20, 40)
    assert img.getpixel((10, 2))[0] > 200  # the stripe is now at the top
    assert img.getpixel((10, 37))[0] < 60


def test_image_hash_is_content_based(tmp_path):
    data = _png(Image.new("RGB", (5, 5), (1, 2, 3)))
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    assert image_sha1(tmp_path / "a.png") == image_sha1(tmp_path / "b.png") == image_sha1(data)
