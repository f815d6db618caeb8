"""Issue #16, server: hostile requests are JSON 4xx (never 500), uploads are decoded off the event
loop inside the concurrency limit, /metrics stays bounded, and only raster images are served."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from moon.data import Product, write_store
from moon.index import build_index_from_vectors
from moon.serve import ServeLimits, create_app


def _png(size=(20, 20), rgb=(30, 40, 220)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(served_index):
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder, limits=ServeLimits(concurrency=2))) as c:
        yield c


def _error(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_a_lone_surrogate_in_the_text_is_a_400(client):
    body = b'{"text": "red \\ud800 shoe"}'  # valid JSON, not valid Unicode
    msg = _error(client.post("/search", content=body, headers={"content-type": "application/json"}), 400)
    assert "lone surrogate" in msg
    _error(client.post("/embed", content=body, headers={"content-type": "application/json"}), 400)


@pytest.mark.parametrize("depth", [100_000, 33])
def test_deeply_nested_json_is_a_400(client, depth):
    body = b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    assert "nests deeper" in _error(
        client.post("/search", content=body, headers={"content-type": "application/json"}), 400
    )


def test_uploads_are_decoded_in_a_worker_slot_and_health_answers_meanwhile(served_index, monkeypatch):
    import moon.serve.app as app_module

    index_dir, _, embedder = served_index
    limits = ServeLimits(concurrency=2, timeout_s=30)
    app = create_app(index_dir, embedder, limits=limits)
    service = app.state.service
    release = threading.Event()
    seen = []
    lock = threading.Lock()
    running = [0]
    real = app_module.load_image

    def recording_load_image(data, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        with lock:
            running[0] += 1
            seen.append({"on_loop": on_loop, "slots_free": service._slots._value, "running": running[0]})
        try:
            release.wait(20)  # held until the health check below has been answered
            return real(data, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(app_module, "load_image", recording_load_image)
    with TestClient(app) as c, ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(c.post, "/search", files={"image": ("q.png", _png(rgb=(i * 40, 20, 20)), "image/png")})
            for i in range(6)
        ]
        while len(seen) < limits.concurrency:  # two decodes are now parked in their slots
            threading.Event().wait(0.01)
        health = c.get("/healthz")  # the event loop is free: decoding does not run on it
        release.set()
        statuses = [f.result().status_code for f in futures]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert statuses == [200] * 6 and len(seen) == 6
    assert not any(s["on_loop"] for s in seen)
    assert all(s["slots_free"] < limits.concurrency for s in seen)  # a slot was held while decoding
    assert max(s["running"] for s in seen) <= limits.concurrency


def test_an_oversized_image_is_refused_before_decoding(served_index):
    index_dir, _, embedder = served_index
    # 23 megapixels of one colour compress to a few tens of KB: the header says how big it is
    bomb = _png(size=(5000, 4600), rgb=(0, 0, 0))
    assert len(bomb) < 200_000
    limits = ServeLimits(max_pixels=1_000_000)
    with TestClient(create_app(index_dir, embedder, limits=limits)) as c:
        assert "too large" in _error(c.post("/search", files={"image": ("q.png", bomb, "image/png")}), 413)


def test_made_up_http_methods_share_one_metrics_series(client):
    for i in range(30):
        client.request(f"BREW{i}", "/search")
    text = client.get("/metrics").text
    assert "BREW" not in text
    from prometheus_client.parser import text_string_to_metric_families

    other = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "moon_requests_total" and sample.labels["method"] == "OTHER"
    ]
    assert len(other) == 1 and other[0].value == 30


def test_svg_is_not_served_and_rasters_say_nosniff(tmp_path, served_index):
    _, _, embedder = served_index
    root = tmp_path / "store"
    (root / "images").mkdir(parents=True)
    svg = root / "images" / "x.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    png = root / "images" / "x.png"
    png.write_bytes(_png())
    write_store(root, [Product(id="p", title="blue bag", images=[svg, png])])
    vectors = np.zeros((1, embedder.dim), np.float32)
    vectors[0, 0] = 1.0  # indexed from a vector: the toy embedder would have to read the SVG
    build_index_from_vectors(
        tmp_path / "idx", ["p"], vectors, model="toy", fingerprint=embedder.fingerprint(), store=str(root)
    )
    with TestClient(create_app(tmp_path / "idx", embedder)) as c:
        r = c.get("/products/p/image")
        assert "not a raster image type" in _error(r, 403)
        assert "svg" not in r.headers["content-type"]
        r = c.get("/products/p/image?n=1")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert r.headers["x-frame-options"] == "DENY"
        assert c.get("/healthz").headers["x-content-type-options"] == "nosniff"
        assert c.get("/nope").headers["x-content-type-options"] == "nosniff"
