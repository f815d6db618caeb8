"""After `detect run`, the embedder reads the stored crops (aspect tag `crop`) through ProductStore."""

import numpy as np
import pytest

from moon.data import ProductStore
from moon.regions import SaliencyDetector, run_detection


@pytest.mark.slow
def test_embedder_encodes_products_with_stored_crops(tiny_store):
    from moon.model import MoonEmbedder

    run_detection(tiny_store.root, SaliencyDetector(), show_progress=False)
    with_crops = ProductStore(tiny_store.root, crop_source="saliency").products()[:3]
    without = ProductStore(tiny_store.root).products()[:3]
    assert all(p.crops for p in with_crops) and not any(p.crops for p in without)
    emb = MoonEmbedder.from_pretrained("moon-tiny")
    a = emb.encode_products(with_crops)
    b = emb.encode_products(without)
    assert a.shape == b.shape == (3, emb.dim) and np.isfinite(a).all()
    assert not np.allclose(a, b)  # the crops changed the input sequence
