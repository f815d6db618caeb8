"""End to end with the real MOON model (the tiny random-initialised preset): index → API → scores."""

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("moon.model")  # temporary guard while moon.model is being written


@pytest.mark.slow
def test_moon_tiny_index_and_api_agree_with_the_embedder(tmp_path, served_index):
    from moon.data import Query, load_image
    from moon.index import VectorIndex, build_index, read_manifest
    from moon.models import load_embedder
    from moon.serve import create_app

    _, store, _ = served_index
    embedder = load_embedder("moon-tiny")
    build_index(embedder, store, tmp_path / "idx", model="moon-tiny", batch_size=4)
    manifest = read_manifest(tmp_path / "idx")
    assert manifest.model == "moon-tiny" and manifest.fingerprint == embedder.fingerprint()
    assert manifest.dim == embedder.dim and manifest.count == 12

    products = store.products()
    product_vectors = embedder.encode_products(products)
    photo_path = store.root / "images" / "red-shoe.png"
    query_vector = embedder.encode_queries([Query(id="q", text="red shoe", images=[load_image(photo_path)])])[0]
    exact = dict(zip([p.id for p in products], (product_vectors @ query_vector).tolist(), strict=True))

    buf = io.BytesIO()
    Image.open(photo_path).save(buf, format="PNG")
    with TestClient(create_app(tmp_path / "idx")) as client:  # the model is loaded from the manifest
        r = client.post(
            "/search", data={"text": "red shoe", "k": "5"}, files={"image": ("q.png", buf.getvalue(), "image/png")}
        )
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 5
    np.testing.assert_allclose([h["score"] for h in hits], sorted(exact.values(), reverse=True)[:5], atol=1e-4)
    np.testing.assert_allclose([h["score"] for h in hits], [exact[h["id"]] for h in hits], atol=1e-4)
    assert len(VectorIndex.open(tmp_path / "idx")) == 12
