"""The one safe way to read an image from the wild.

:func:`load_image` opens a path, bytes or a binary file object, checks it, applies the EXIF
orientation, converts any mode to RGB (transparency is composited on white, 16-bit data scaled
down) and refuses decompression bombs. A path is opened with :mod:`moon.data.safe_open`: a named
pipe, device, socket or directory is refused without blocking, and a file over the byte limit
(:func:`max_image_bytes`) is refused before it is read. Every failure is an
:class:`ImageLoadError` that names the source and the reason, never a bare PIL exception.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from moon.data.safe_open import FileRefusedError, read_at_most, read_regular
from moon.errors import ConfigError, DataError

#: Default limit on width × height (about 8k × 8k); configurable per call.
DEFAULT_MAX_PIXELS = 64_000_000
#: Default limit on the size of an image file (8× the server's upload limit,
#: ``ServeLimits.max_body_bytes``); configurable per call or with ``$MOON_MAX_IMAGE_BYTES``.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_BYTES_ENV = "MOON_MAX_IMAGE_BYTES"

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image]


class ImageLoadError(DataError):
    """An image could not be read: ``"<source>: <reason>"``."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def _describe(src: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src):,} bytes>"
    return getattr(src, "name", None) or "<image stream>"


def max_image_bytes() -> int:
    """The file-size limit of an image: ``$MOON_MAX_IMAGE_BYTES`` if set, else :data:`DEFAULT_MAX_BYTES`."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{MAX_BYTES_ENV} must be a whole number of bytes >= 1, got {raw!r}")
    return value


def _read_bytes(src: ImageSource, label: str, max_bytes: int | None = None) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        # already in memory (the server caps uploads itself): only an explicit max_bytes applies
        if max_bytes is not None and len(src) > max_bytes:
            raise ImageLoadError(label, f"too large ({len(src):,} bytes > limit {max_bytes:,} bytes)")
        return bytes(src)
    limit = max_image_bytes() if max_bytes is None else max_bytes
    hint = f"; set {MAX_BYTES_ENV} to raise it" if max_bytes is None else ""
    if isinstance(src, (str, os.PathLike)):
        # never a plain open(): a FIFO would block, /dev/zero would never end (see safe_open)
        try:
            return read_regular(src, limit, what="an image", label=label, hint=hint)
        except FileRefusedError as exc:
            raise ImageLoadError(label, exc.reason) from exc
    try:
        data = read_at_most(src, limit + 1)
    except Exception as exc:  # noqa: BLE001 - any stream failure is reported the same way
        raise ImageLoadError(label, f"cannot be read ({exc})") from exc
    if len(data) > limit:
        raise ImageLoadError(label, f"too large (more than the limit of {limit:,} bytes{hint})")
    return data


def read_image_bytes(src: ImageSource, *, max_bytes: int | None = None, name: str | None = None) -> bytes:
    """The raw bytes of an image source (a path, bytes or a binary stream), read the safe way.

    A path must be a regular file (not a FIFO, device, socket or directory) of at most ``max_bytes``
    bytes (default :func:`max_image_bytes`); at most ``max_bytes + 1`` bytes are ever read from a
    path or a stream.
    Decoding is not attempted: pass the bytes to :func:`load_image` with ``name=``.
    """
    if isinstance(src, Image.Image):
        raise TypeError("read_image_bytes takes a path, bytes or a binary stream, not a PIL image")
    return _read_bytes(src, _describe(src, name), max_bytes)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode == "CMYK":
        # PIL's CMYK→RGB handles Adobe-inverted JPEGs on decode; a plain convert is correct here.
        return img.convert("RGB")
    return img.convert("RGB")


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Open, verify and normalise an image.

    Args:
        src: a path, raw bytes, a binary file object, or an already-open ``PIL.Image``.
        max_pixels: refuse images whose width × height exceeds this (decompression bombs); PIL's
            own ``Image.MAX_IMAGE_PIXELS`` check still applies on top.
        max_bytes: refuse a file or stream larger than this many bytes before decoding it (at
            most ``max_bytes + 1`` bytes are read); default :func:`max_image_bytes` (64 MiB, or
            ``$MOON_MAX_IMAGE_BYTES``). Raw ``bytes`` are checked only against an explicit limit.
            A path must be a regular file: a FIFO, device, socket or directory is refused
            without blocking.
        name: how to name the source in error messages (defaults to the path).

    Returns:
        A fully loaded RGB ``PIL.Image`` with EXIF orientation applied.

    Raises:
        ImageLoadError: empty, missing, not a regular file, truncated, not an image, or too large.
    """
    label = _describe(src, name)
    if isinstance(src, Image.Image):
        w, h = src.size
        if w * h > max_pixels:
            raise ImageLoadError(label, f"too large ({w}×{h} = {w * h:,} pixels > limit {max_pixels:,})")
        return _to_rgb(ImageOps.exif_transpose(src))
    data = _read_bytes(src, label, max_bytes)
    if not data:
        raise ImageLoadError(label, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            probe = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageLoadError(label, "not an image (unrecognised format)") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(label, f"too large ({exc})") from exc
        except Exception as exc:  # noqa: BLE001
            raise ImageLoadError(label, f"not a readable image ({exc})") from exc
        w, h = probe.size
        if w <= 0 or h <= 0:
            raise ImageLoadError(label, f"invalid size {w}×{h}")
        if w * h > max_pixels:
            raise ImageLoadError(label, f"too large ({w}×{h} = {w * h:,} pixels > limit {max_pixels:,})")
        # PIL's own bomb check (its MAX_IMAGE_PIXELS) stays as the user configured it; no global
        # state is touched, so concurrent loads (the server's threads) cannot interfere.
        try:
            probe.verify()
            img = Image.open(io.BytesIO(data))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(label, f"too large ({exc})") from exc
        except OSError as exc:
            msg = str(exc)
            if "truncated" in msg or "broken data stream" in msg or "not enough data" in msg:
                raise ImageLoadError(label, f"truncated ({len(data):,} bytes read)") from exc
            raise ImageLoadError(label, f"corrupt image data ({msg})") from exc
        except Exception as exc:  # noqa: BLE001
            raise ImageLoadError(label, f"corrupt image data ({exc})") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture
        pass
    return _to_rgb(img)


def image_sha1(src: ImageSource, *, max_bytes: int | None = None) -> str:
    """SHA-1 of the raw bytes of an image file (or of the RGB pixels of a ``PIL.Image``); the file is
    read the way :func:`load_image` reads it (regular files only, at most ``max_bytes``)."""
    if isinstance(src, Image.Image):
        rgb = _to_rgb(src)
        h = hashlib.sha1(f"{rgb.size}".encode())
        h.update(rgb.tobytes())
        return h.hexdigest()
    return hashlib.sha1(_read_bytes(src, _describe(src, None), max_bytes)).hexdigest()
