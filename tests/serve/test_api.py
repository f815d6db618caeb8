import base64
import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from moon.data import Product, write_store
from moon.errors import ConfigError
from moon.index import build_index
from moon.serve import ServeLimits, create_app


def png_bytes(rgb=(30, 40, 220), size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(served_index):
    index_dir, _, embedder = served_index
    limits = ServeLimits(max_body_bytes=200_000, max_pixels=10_000, max_text_chars=50, max_k=100, timeout_s=10)
    with TestClient(create_app(index_dir, embedder, limits=limits)) as c:
        yield c


def scrape(text):
    """The samples of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == status and body["error"]["message"]
    return body["error"]["message"]


def test_search_by_json_text_known_answer(client):
    r = client.post("/search", json={"text": "green hat", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == {"text": "green hat", "images": 0, "modality": "text", "k": 3}
    top = body["results"][0]
    assert (top["id"], top["title"], top["rank"]) == ("green-hat", "green hat", 1)
    assert top["image_url"] == "/products/green-hat/image" and len(body["results"]) == 3
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_by_upload_and_by_base64_agree(client):
    photo = png_bytes((30, 40, 220))
    r1 = client.post("/search", data={"text": "bag", "k": "2"}, files={"image": ("q.png", photo, "image/png")})
    r2 = client.post("/search", json={"text": "bag", "k": 2, "image": base64.b64encode(photo).decode()})
    assert r1.status_code == r2.status_code == 200
    assert r1.json()["results"] == r2.json()["results"]
    assert r1.json()["results"][0]["id"] == "blue-bag" and r1.json()["query"]["modality"] == "multimodal"
    image_only = client.post("/search", files={"image": ("q.png", png_bytes((220, 20, 20)), "image/png")}).json()
    assert image_only["query"]["modality"] == "image" and image_only["results"][0]["id"].startswith("red-")


def test_embed_matches_the_library(client, served_index):
    _, _, embedder = served_index
    from moon.data import Query

    r = client.post("/embed", json={"text": "yellow shoe"})
    assert r.status_code == 200
    body = r.json()
    want = embedder.encode_queries([Query(id="x", text="yellow shoe")])[0]
    assert body["dim"] == 16 and body["fingerprint"] == embedder.fingerprint()
    np.testing.assert_allclose(body["embedding"], want, rtol=1e-6)


def test_products_and_images(client, served_index):
    _, store, _ = served_index
    r = client.get("/products/red-bag")
    assert r.status_code == 200
    body = r.json()
    assert body["title"] == "red bag" and body["indexed"] is True
    assert body["images"] == ["/products/red-bag/image"]
    assert str(store.root) not in r.text  # no file-system paths leak
    img = client.get("/products/red-bag/image")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (store.root / "images" / "red-bag.png").read_bytes()
    error_of(client.get("/products/nope"), 404)
    error_of(client.get("/products/nope/image"), 404)
    error_of(client.get("/products/red-bag/image?n=1"), 404)
    error_of(client.get("/products/red-bag/image?n=x"), 400)
    # ids are dictionary keys, never paths: traversal attempts find nothing
    for attempt in ["..%2F..%2Fetc%2Fpasswd", "%2E%2E", "images%2Fred-bag.png", "manifest.json"]:
        r = client.get(f"/products/{attempt}/image")
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"


def test_bad_requests_are_json_errors(client):
    assert "between 1 and 100" in error_of(client.post("/search", json={"text": "hat", "k": 101}), 400)
    error_of(client.post("/search", json={"text": "hat", "k": 0}), 400)
    error_of(client.post("/search", json={"text": "hat", "k": "many"}), 400)
    error_of(client.post("/search", json={"text": "hat", "k": 2.5}), 400)
    assert "limit is 50" in error_of(client.post("/search", json={"text": "x" * 51}), 400)
    assert "text, an image" in error_of(client.post("/search", json={"text": "   "}), 400)
    error_of(client.post("/search", json={"text": 5}), 400)
    assert "unknown field" in error_of(client.post("/search", json={"txt": "hat"}), 400)
    error_of(client.post("/search", json=["hat"]), 400)
    error_of(client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 400)
    error_of(client.post("/search", content=b"text=hat", headers={"content-type": "text/plain"}), 415)
    assert "base64" in error_of(client.post("/search", json={"image": "***"}), 400)
    bad_image = client.post("/search", files={"image": ("q.png", b"not an image at all", "image/png")})
    assert "not an image" in error_of(bad_image, 400)
    huge = client.post("/search", files={"image": ("q.png", png_bytes(size=(200, 200)), "image/png")})
    assert "too large" in error_of(huge, 413)  # 40,000 pixels > 10,000
    assert "200,000 bytes" in error_of(client.post("/search", json={"text": "a" * 300_000}), 413)
    error_of(client.get("/no-such-route"), 404)
    error_of(client.get("/search"), 405)


def test_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert "exceeds the limit" in error_of(r, 413)


def test_health_metrics_and_page(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["products"] == 12 and health["kind"] == "exact"
    client.post("/search", json={"text": "hat", "k": 1})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in scrape(metrics.text)}
    assert samples[("moon_requests_total", (("method", "POST"), ("route", "/search"), ("status", "200")))] >= 1
    assert samples[("moon_index_products", ())] == 12
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and 'type="file"' in page.text


def test_timeout_is_a_json_504(served_index):
    index_dir, _, embedder = served_index

    class Slow:
        name, dim = embedder.name, embedder.dim
        fingerprint = embedder.fingerprint
        encode_products = embedder.encode_products

        def encode_queries(self, queries, **kw):
            time.sleep(1.0)
            return embedder.encode_queries(queries)

    with TestClient(create_app(index_dir, Slow(), limits=ServeLimits(timeout_s=0.2))) as c:
        assert "0.2 s limit" in error_of(c.post("/search", json={"text": "hat"}), 504)
        assert "0.2 s limit" in error_of(c.post("/embed", json={"text": "hat"}), 504)


def test_refuses_a_model_that_does_not_match_the_index(served_index, other_embedder):
    index_dir, _, _ = served_index
    with pytest.raises(ConfigError, match="fingerprint"):
        create_app(index_dir, other_embedder)


def test_images_outside_the_store_are_not_served(tmp_path, served_index):
    _, _, embedder = served_index
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    root = tmp_path / "store"
    (root / "images").mkdir(parents=True)
    (root / "images" / "link.png").symlink_to(outside)  # inside by name, outside once resolved
    write_store(root, [Product(id="p", title="blue bag", images=[root / "images" / "link.png"])])
    build_index(embedder, root, tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx", embedder)) as c:
        assert "outside the store" in error_of(c.get("/products/p/image"), 403)
        assert json.loads(c.get("/products/p").text)["images"] == ["/products/p/image"]


def test_limits_are_validated():
    with pytest.raises(ConfigError, match="max_k"):
        ServeLimits(max_k=101)
    with pytest.raises(ConfigError, match="timeout_s"):
        ServeLimits(timeout_s=0)
