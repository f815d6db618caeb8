"""The OpenAI-compatible routes: ``POST /v1/embeddings`` equals the library's ``encode_queries``
(text, image, multimodal), ``dimensions`` truncates and renormalises (only where allowed),
``encoding_format=base64`` carries the same float32 values, malformed requests are JSON 4xx in
the server's one error shape, and the official ``openai`` client works against a running server."""

from __future__ import annotations

import base64
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from moon.data import Query, load_image
from moon.serve import ServeLimits, create_app

LIMITS = dict(max_body_bytes=200_000, max_pixels=10_000, max_text_chars=50, timeout_s=10)


def png(rgb=(30, 40, 220), size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_part(image: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


@pytest.fixture(scope="module")
def client(served_index):
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder, limits=ServeLimits(**LIMITS))) as c:
        yield c


@pytest.fixture(scope="module")
def truncating_client(served_index):
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder, limits=ServeLimits(**LIMITS, allow_truncation=True))) as c:
        yield c


def embed(client, **body):
    r = client.post("/v1/embeddings", json={"model": "toy", **body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["model"] == "toy"
    assert [d["index"] for d in out["data"]] == list(range(len(out["data"])))
    assert all(d["object"] == "embedding" for d in out["data"])
    return out


def vectors(out) -> np.ndarray:
    return np.asarray([d["embedding"] for d in out["data"]], dtype=np.float32)


def error_of(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return error["message"]


def test_string_input_equals_the_library(client, served_index):
    _, _, embedder = served_index
    out = embed(client, input="yellow shoe")
    want = embedder.encode_queries([Query(id="q", text="yellow shoe")])
    np.testing.assert_allclose(vectors(out), want, atol=1e-5)
    # the toy model has no tokenizer: the usage is the documented estimate, ceil(chars / 4)
    assert out["usage"] == {"prompt_tokens": math.ceil(len("yellow shoe") / 4), "total_tokens": 3}


def test_list_input_equals_the_library_in_order(client, served_index):
    _, _, embedder = served_index
    texts = ["red shoe", "green hat", "blue bag"]
    out = embed(client, input=texts)
    want = embedder.encode_queries([Query(id=str(i), text=t) for i, t in enumerate(texts)])
    np.testing.assert_allclose(vectors(out), want, atol=1e-5)
    assert out["usage"]["prompt_tokens"] == sum(math.ceil(len(t) / 4) for t in texts)


def test_image_and_multimodal_items_equal_the_library(client, served_index):
    _, _, embedder = served_index
    photo = png((220, 20, 20))
    out = embed(
        client,
        input=[
            {"content": [image_part(photo)]},
            {"content": [{"type": "text", "text": "red bag"}, image_part(photo)]},
            "red bag",
        ],
    )
    image = load_image(photo)
    want = embedder.encode_queries(
        [Query(id="a", images=[image]), Query(id="b", text="red bag", images=[image]), Query(id="c", text="red bag")]
    )
    np.testing.assert_allclose(vectors(out), want, atol=1e-5)
    assert not np.allclose(vectors(out)[0], vectors(out)[1])  # the text part counts
    assert out["usage"]["prompt_tokens"] == 2 * math.ceil(len("red bag") / 4)  # images count no tokens


def test_the_embed_route_and_v1_agree(client):
    old = client.post("/embed", json={"text": "bag", "image": base64.b64encode(png()).decode()}).json()["embedding"]
    new = embed(client, input=[{"content": [{"type": "text", "text": "bag"}, image_part(png())]}])
    np.testing.assert_allclose(vectors(new)[0], old, atol=1e-6)


@pytest.mark.parametrize("d", [1, 5, 15])
def test_dimensions_keep_the_first_d_coordinates_renormalised(truncating_client, served_index, d):
    _, _, embedder = served_index
    text = "a b c d e f g h"  # the toy vector of this text has non-zero coordinates 0, 3, 4, 5 and 15
    full = embedder.encode_queries([Query(id="q", text=text)])[0]
    got = vectors(embed(truncating_client, input=text, dimensions=d))[0]
    assert got.shape == (d,)
    assert abs(np.linalg.norm(got) - 1) < 1e-5
    np.testing.assert_allclose(got, full[:d] / np.linalg.norm(full[:d]), atol=1e-5)


def test_an_all_zero_prefix_stays_zero(truncating_client, served_index):
    _, _, embedder = served_index
    assert embedder.encode_queries([Query(id="q", text="green hat")])[0][0] == 0  # coordinates 4, 8, 15 only
    assert vectors(embed(truncating_client, input="green hat", dimensions=1)).tolist() == [[0.0]]


def test_dimensions_are_refused_without_matryoshka_training_or_the_option(client, served_index):
    _, _, embedder = served_index
    msg = error_of(client.post("/v1/embeddings", json={"model": "toy", "input": "hat", "dimensions": 8}), 400)
    assert "--allow-truncation" in msg and "Matryoshka" in msg
    # the model's own dimension is no truncation: always allowed, and the library's vector
    full = vectors(embed(client, input="hat", dimensions=16))[0]
    np.testing.assert_allclose(full, embedder.encode_queries([Query(id="q", text="hat")])[0], atol=1e-5)
    for d in (0, -1, 17):
        assert "between 1 and 16" in error_of(
            client.post("/v1/embeddings", json={"model": "toy", "input": "hat", "dimensions": d}), 400
        )


def test_a_matryoshka_trained_model_truncates_without_the_option(served_index):
    index_dir, _, embedder = served_index

    class Matryoshka(type(embedder)):
        config = SimpleNamespace(matryoshka_dim=16)

    with TestClient(create_app(index_dir, Matryoshka(), limits=ServeLimits(**LIMITS))) as c:
        assert vectors(embed(c, input="hat", dimensions=4)).shape == (1, 4)


def test_base64_decodes_to_the_same_floats(client):
    floats = vectors(embed(client, input=["red shoe", "blue hat"]))
    out = embed(client, input=["red shoe", "blue hat"], encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in out["data"]])
    np.testing.assert_array_equal(decoded, floats)


def test_models_lists_the_served_model(client, served_index):
    _, _, embedder = served_index
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "toy" and card["object"] == "model" and card["owned_by"] == "moon"
    assert isinstance(card["created"], int) and card["dim"] == 16 and card["fingerprint"] == embedder.fingerprint()


BAD = [
    ({"model": "toy"}, 400, "input: Field required"),
    ({"input": "hat"}, 400, "model: Field required"),
    ({"model": "toy", "input": 5}, 400, "input must be a string"),
    ({"model": "toy", "input": [[1, 2, 3]]}, 400, "token arrays are not supported"),
    ({"model": "toy", "input": None}, 400, "input must be a string"),
    ({"model": "toy", "input": []}, 400, "empty list"),
    ({"model": "toy", "input": ""}, 400, "input[0] is empty"),
    ({"model": "toy", "input": ["hat", "   "]}, 400, "input[1] is empty"),
    ({"model": "toy", "input": "x" * 51}, 400, "the limit is 50"),
    ({"model": "toy", "input": [{"content": []}]}, 400, "input[0] is empty"),
    ({"model": "toy", "input": [{"contents": []}]}, 400, "input[0].content: Field required"),
    ({"model": "toy", "input": [{"content": [{"type": "txt", "text": "a"}]}]}, 400, "input[0].content[0]"),
    ({"model": "toy", "input": [{"content": [{"type": "text", "text": 5}]}]}, 400, "input[0].content[0].text"),
    (
        {"model": "toy", "input": [{"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
        400,
        "at most one of each",
    ),
    (
        {
            "model": "toy",
            "input": [{"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,***"}}]}],
        },
        400,
        "not valid base64",
    ),
    (
        {"model": "toy", "input": [{"content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]},
        400,
        "must be base64",
    ),
    (
        {
            "model": "toy",
            "input": [{"content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
        },
        400,
        "remote image URLs are not fetched",
    ),
    (
        {
            "model": "toy",
            "input": [{"content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}}]}],
        },
        400,
        "remote image URLs are not fetched",
    ),
    (
        {"model": "toy", "input": [{"content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
        400,
        "must be a data URL",
    ),
    (
        {"model": "toy", "input": [{"content": [image_part(b"not an image")]}]},
        400,
        "not an image",
    ),
    ({"model": "toy", "input": "hat", "dimensions": "3"}, 400, "dimensions"),
    ({"model": "toy", "input": "hat", "dimensions": True}, 400, "dimensions"),
    ({"model": "toy", "input": "hat", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "toy", "input": "hat", "temperature": 1}, 400, "temperature: Extra inputs are not permitted"),
    ({"model": "gpt-4", "input": "hat"}, 404, "'gpt-4' does not exist here; this server serves 'toy'"),
    ({"model": 3, "input": "hat"}, 400, "model"),
    (["hat"], 400, "must be an object"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_requests_are_json_4xx(client, body, status, fragment):
    assert fragment in error_of(client.post("/v1/embeddings", json=body), status)


def test_malformed_bodies_and_limits_are_json_4xx(client):
    headers = {"content-type": "application/json"}
    assert "not valid JSON" in error_of(client.post("/v1/embeddings", content=b"{nope", headers=headers), 400)
    surrogate = b'{"model": "toy", "input": ["red \\ud800 shoe"]}'  # valid JSON, not valid Unicode
    assert "lone surrogate" in error_of(client.post("/v1/embeddings", content=surrogate, headers=headers), 400)
    deep = b'{"model": "toy", "input": ' + b"[" * 100 + b"]" * 100 + b"}"
    assert "nests deeper" in error_of(client.post("/v1/embeddings", content=deep, headers=headers), 400)
    plain = client.post("/v1/embeddings", content=b"hat", headers={"content-type": "text/plain"})
    assert "application/json" in error_of(plain, 415)
    huge = {"model": "toy", "input": "a" * 300_000}
    assert "200,000 bytes" in error_of(client.post("/v1/embeddings", json=huge), 413)
    big = {"model": "toy", "input": [{"content": [image_part(png(size=(200, 200)))]}]}
    assert "too large" in error_of(client.post("/v1/embeddings", json=big), 413)  # 40,000 > 10,000 pixels
    # the pixel limit holds for the images of one request together: 2 × 6,400 > 10,000
    two = {"model": "toy", "input": [{"content": [image_part(png(size=(80, 80)))]} for _ in range(2)]}
    assert "together" in error_of(client.post("/v1/embeddings", json=two), 413)
    many = {"model": "toy", "input": ["a"] * 2049}
    assert "the limit is 2,048" in error_of(client.post("/v1/embeddings", json=many), 400)
    assert error_of(client.get("/v1/embeddings"), 405)


def test_every_route_answers_errors_in_one_shape(client):
    error_of(client.post("/search", json={"text": "hat", "k": 0}), 400)
    error_of(client.get("/products/nope"), 404)
    error_of(client.post("/v1/embeddings", json={"model": "nope", "input": "hat"}), 404)


def test_the_timeout_applies(served_index):
    import time

    index_dir, _, embedder = served_index

    class Slow(type(embedder)):
        def encode_queries(self, queries, **kw):
            time.sleep(1.0)
            return super().encode_queries(queries, **kw)

    with TestClient(create_app(index_dir, Slow(), limits=ServeLimits(timeout_s=0.2))) as c:
        assert "0.2 s limit" in error_of(c.post("/v1/embeddings", json={"model": "toy", "input": "hat"}), 504)


def test_the_openai_client_against_a_running_server(served_index, start_server):
    openai = pytest.importorskip("openai")
    index_dir, _, embedder = served_index
    server = start_server(create_app(index_dir, embedder))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=30)

    texts = ["red shoe", "green hat"]
    want = embedder.encode_queries([Query(id=str(i), text=t) for i, t in enumerate(texts)])
    one = client.embeddings.create(model="toy", input="red shoe", encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-5)
    assert one.model == "toy" and one.usage.prompt_tokens == one.usage.total_tokens > 0
    # the client's default: it asks for base64 and decodes it itself
    listed = client.embeddings.create(model="toy", input=texts)
    np.testing.assert_allclose([d.embedding for d in listed.data], want, atol=1e-5)
    raw = client.embeddings.create(model="toy", input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    np.testing.assert_allclose(decoded, want, atol=1e-5)
    assert [m.id for m in client.models.list().data] == ["toy"]
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.embeddings.create(model="nope", input="hat")
    with pytest.raises(openai.BadRequestError, match="allow-truncation"):
        client.embeddings.create(model="toy", input="hat", dimensions=4)
