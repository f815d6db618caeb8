"""Shared fixtures: tiny embedders (built once per session) and synthetic products/queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moon.data import Product, Query

# The tiny models are far faster single-threaded on a shared, loaded CI machine (OpenMP threads
# spin against each other); results do not depend on it.
torch.set_num_threads(1)


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    sizes = [(160, 120), (100, 200), (64, 64), (300, 90), (128, 128)]
    return [make_image(i, s) for i, s in enumerate(sizes)]


@pytest.fixture(scope="session")
def products(images) -> list[Product]:
    return [
        Product("p-multimodal", "Red running shoe", [images[0]], ["Apparel", "Shoes"], {"color": ["red"]}),
        Product(
            "p-multi-image",
            "Blue ceramic mug with a long description of the glaze " * 3,
            [images[1], images[2], images[3]],
            ["Home", "Kitchen", "Mugs"],
            {"color": ["blue"], "material": ["ceramic", "clay"]},
            crops=[images[4]],
        ),
        Product("p-text-only", "USB cable", [], ["Electronics"], {}),
        Product("p-image-only", "", [images[4]]),
        Product("p-empty", ""),
    ]


@pytest.fixture(scope="session")
def queries(images) -> list[Query]:
    return [
        Query("q-text", "red shoes"),
        Query("q-image", None, [images[0]]),
        Query("q-multimodal", "a mug like this but blue and bigger", [images[1], images[3]]),
        Query("q-multi-image", None, [images[2], images[3], images[4]]),
    ]


@pytest.fixture(scope="session")
def tiny():
    from moon.model import MoonEmbedder

    return MoonEmbedder.from_pretrained("moon-tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_dense():
    from moon.model import MoonEmbedder

    return MoonEmbedder.from_pretrained("moon-tiny", device="cpu", moe_mode="dense")
