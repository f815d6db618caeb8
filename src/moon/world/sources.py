"""Real image sources of the product world, all offline.

* object drawings: Debian ``openclipart-png`` (transparent PNGs in a folder taxonomy), curated by
  file name (icons, buttons, signs, flags, shapes, people, diagrams and weapons are left out;
  black-and-white twins, the same file in several folders and oversized files are dropped);
* product photos: Debian ``dataset-fashion-mnist`` (28×28 grey Zalando photos, 10 classes);
* background photos: scikit-image's bundled photos and darknet's sample photos, plus procedural
  textures made in :mod:`moon.world.textures`.

Decoded sprites sit in a bounded LRU cache, so memory stays flat however large the world is.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from moon.data.images import max_image_bytes, read_image_bytes
from moon.data.safe_open import open_regular
from moon.errors import DataError, MoonError
from moon.world.taxonomy import EXCLUDE_FILES, EXCLUDE_TOKENS, NOUN_PATHS, PRODUCT_FOLDERS, noun_of_tokens

OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
DARKNET_DATA = Path("/usr/share/darknet/data")

#: longest side of a decoded sprite (pixels); drawings larger than MAX_SOURCE_PIXELS are skipped
SPRITE_SIDE = 256
MAX_SOURCE_PIXELS = 1_500_000
BACKGROUND_SIDE = 480

_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "color.png")
_DARKNET_PHOTOS = ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg", "scream.jpg")
_SKIMAGE_TEXTURES = ("brick.png", "grass.png", "gravel.png")


class WorldSourceError(MoonError):
    """A data source of the product world is missing or unreadable (the message says how to fix it)."""


@dataclass(frozen=True)
class ClipartModel:
    """One curated drawing: its file, the leaf noun it shows and the category path."""

    path: str
    noun: str
    category: tuple[str, str, str, str]


def _tokens(stem: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", stem.lower()) if t]


_VARIANT_TOKENS = frozenset(
    "bw alt r s a b c color colour black white red blue green yellow orange purple pink brown grey gray".split()
)


def _near_duplicate_key(tokens: list[str]) -> tuple[str, ...]:
    """File-name tokens without numbers, colour words and variant marks: copies of one drawing share it."""
    stripped = (re.sub(r"\d+", "", t) for t in tokens)
    return tuple(t for t in stripped if t and t not in _VARIANT_TOKENS)


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise WorldSourceError(
            f"{path} is missing: the product world needs the Debian package {package} "
            f"(run: apt-get update && apt-get install -y {package})"
        )


@lru_cache(maxsize=4)
def clipart_models(root: str = str(OPENCLIPART_ROOT)) -> tuple[ClipartModel, ...]:
    """The curated product drawings, in a fixed (sorted) order."""
    base = Path(root)
    _require(base, "openclipart-png")
    by_name: dict[str, ClipartModel] = {}
    seen_keys: set[tuple[str, ...]] = set()
    for folder in PRODUCT_FOLDERS:
        d = base / folder
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.png")):
            tokens = _tokens(f.stem)
            if not tokens or f.name in EXCLUDE_FILES or any(t in EXCLUDE_TOKENS for t in tokens):
                continue
            if "bw" in tokens:
                continue  # black-and-white twin of a colour drawing (products get recoloured anyway)
            if f.name in by_name:
                continue  # the same drawing filed in two folders
            noun = noun_of_tokens(tokens)
            if noun is None:
                continue
            key = _near_duplicate_key(tokens)
            if key in seen_keys:
                continue  # cone1/cone2, balloon-red/balloon-blue: one drawing in several copies
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    # opened the safe way (a FIFO is refused, never waited on); only the header is read
                    with open_regular(f, max_image_bytes(), what="an image") as fh, Image.open(fh) as im:
                        w, h = im.size
            except (OSError, Image.DecompressionBombError, DataError):
                continue
            if w * h > MAX_SOURCE_PIXELS or min(w, h) < 24 or max(w, h) > 6 * min(w, h):
                continue
            seen_keys.add(key)
            by_name[f.name] = ClipartModel(str(f), noun, NOUN_PATHS[noun])
    models = tuple(sorted(by_name.values(), key=lambda m: m.path))
    if not models:
        raise WorldSourceError(f"{base}: no usable drawings found (is openclipart-png installed completely?)")
    return models


def _alpha_from_white(rgb: np.ndarray) -> np.ndarray:
    """Alpha for a drawing without transparency: everything not near-white is opaque."""
    dist = 255.0 - rgb.astype(np.float32).min(axis=2)
    return np.clip((dist - 8.0) * 12.0, 0, 255).astype(np.uint8)


def _trim(rgba: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    if len(xs) == 0:
        return rgba
    return rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


class SpriteCache:
    """Bounded LRU cache of decoded sprites: ``path → RGBA uint8 array (h, w, 4)``, trimmed to content."""

    def __init__(self, max_items: int = 256):
        self.max_items = max_items
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, path: str) -> np.ndarray:
        hit = self._items.get(path)
        if hit is not None:
            self._items.move_to_end(path)
            return hit
        arr = self._load(path)
        self._items[path] = arr
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return arr

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _load(path: str) -> np.ndarray:
        try:
            data = read_image_bytes(path)  # bounded; a FIFO, device or directory is refused without blocking
        except DataError as exc:
            raise WorldSourceError(f"unreadable drawing: {exc}") from exc
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = np.asarray(im.convert("RGBA")).copy()
                else:
                    rgb = np.asarray(im.convert("RGB"))
                    rgba = np.dstack([rgb, _alpha_from_white(rgb)])
        except OSError as exc:
            raise WorldSourceError(f"{path}: unreadable drawing ({exc})") from exc
        border = np.concatenate([rgba[0, :, 3], rgba[-1, :, 3], rgba[:, 0, 3], rgba[:, -1, 3]])
        if (border > 0).mean() > 0.9:  # drawn on an opaque (white) sheet: cut the sheet away
            rgba[..., 3] = np.minimum(rgba[..., 3], _alpha_from_white(rgba[..., :3]))
        # transparent pixels keep no colour: avoids dark fringes when resampling
        rgba[rgba[..., 3] == 0, :3] = 255
        rgba = _trim(rgba)
        h, w = rgba.shape[:2]
        scale = SPRITE_SIDE / max(h, w)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            rgba = np.asarray(Image.fromarray(rgba, "RGBA").resize(size, Image.LANCZOS))
        return np.ascontiguousarray(rgba)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def fashion_mnist(root: str = str(FASHION_MNIST_ROOT)) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST test set: images ``(10000, 28, 28)`` uint8 and labels ``(10000,)``."""
    base = Path(root)
    images, labels = base / "t10k-images-idx3-ubyte.gz", base / "t10k-labels-idx1-ubyte.gz"
    _require(images, "dataset-fashion-mnist")
    _require(labels, "dataset-fashion-mnist")
    try:
        return _read_idx(images), _read_idx(labels)
    except (OSError, ValueError) as exc:
        raise WorldSourceError(f"{base}: unreadable Fashion-MNIST files ({exc})") from exc


def fashion_sprite(image: np.ndarray) -> np.ndarray:
    """A 28×28 grey Fashion-MNIST photo → RGBA ``(112, 112, 4)``: grey shading, black background transparent."""
    big = np.asarray(Image.fromarray(image, "L").resize((112, 112), Image.BICUBIC)).astype(np.float32)
    alpha = np.clip((big - 6.0) * 10.0, 0, 255)
    shade = np.clip(big * 1.15 + 20.0, 0, 255)
    rgba = np.dstack([shade, shade, shade, alpha]).astype(np.uint8)
    rgba[rgba[..., 3] == 0, :3] = 255
    return _trim(rgba)


def _skimage_data_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")  # located, not imported: its data folder is all we need
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _fit(img: Image.Image, side: int) -> np.ndarray:
    img = img.convert("RGB")
    scale = side / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img))


@lru_cache(maxsize=2)
def background_photos(darknet_dir: str = str(DARKNET_DATA)) -> tuple[tuple[str, np.ndarray], ...]:
    """Real photos used as scene backgrounds: ``(name, RGB array)`` pairs, shortest side ≤ 480 px."""
    found: list[tuple[str, np.ndarray]] = []
    sk = _skimage_data_dir()
    candidates = [(f"skimage/{name}", sk / name) for name in _SKIMAGE_PHOTOS + _SKIMAGE_TEXTURES if sk is not None]
    candidates += [(f"darknet/{name}", Path(darknet_dir) / name) for name in _DARKNET_PHOTOS]
    for label, path in candidates:
        if not path.is_file():
            continue
        try:  # read the safe way: a file swapped for a FIFO or grown huge is skipped, never waited on
            with Image.open(io.BytesIO(read_image_bytes(path))) as im:
                found.append((label, _fit(im, BACKGROUND_SIDE)))
        except (OSError, DataError, Image.DecompressionBombError) as exc:
            warnings.warn(f"background photo skipped: {exc}", stacklevel=2)
    if not found:
        raise WorldSourceError(
            "no background photos found: install scikit-image (pip install scikit-image) "
            "or the Debian package darknet (apt-get update && apt-get install -y darknet)"
        )
    return tuple(found)
