"""Issue #25, serving slice 3: the routes' declared pydantic schemas are what ``/openapi.json``
serves, ``/docs`` has a CSP that lets its page run, and ``/metrics`` is ``prometheus_client``'s
exposition with bounded labels, in a registry of its own per app."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from moon.serve import ServeLimits, create_app


@pytest.fixture(scope="module")
def client(served_index):
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder, limits=ServeLimits(max_k=20))) as c:
        yield c


def samples(client) -> list:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return [s for family in text_string_to_metric_families(r.text) for s in family.samples]


def resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/"), ref
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def body_schema(spec: dict, path: str, media: str = "application/json") -> dict:
    return resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"][media]["schema"])


def response_schema(spec: dict, path: str, method: str = "post") -> dict:
    return resolve(spec, spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"])


# -- OpenAPI ---------------------------------------------------------------------------------
def test_openapi_declares_the_request_and_response_schemas(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")

    search = body_schema(spec, "/search")
    assert set(search["properties"]) == {"text", "image", "k"} and search["additionalProperties"] is False
    assert search["properties"]["k"].items() >= {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}.items()
    form = body_schema(spec, "/search", "multipart/form-data")
    assert form["properties"]["image"].items() >= {"type": "string", "format": "binary"}.items()
    assert set(response_schema(spec, "/search")["properties"]) == {"query", "took_ms", "results"}
    result = resolve(spec, response_schema(spec, "/search")["properties"]["results"]["items"])
    assert set(result["properties"]) == {"rank", "id", "score", "title", "image_url", "product_url"}

    assert set(body_schema(spec, "/embed")["properties"]) == {"text", "image", "k"}
    assert "multipart/form-data" in spec["paths"]["/embed"]["post"]["requestBody"]["content"]
    assert set(response_schema(spec, "/embed")["properties"]) == {"model", "fingerprint", "dim", "embedding"}

    embeddings = body_schema(spec, "/v1/embeddings")
    assert set(embeddings["properties"]) == {"input", "model", "dimensions", "encoding_format", "user"}
    assert set(embeddings["required"]) == {"input", "model"}
    assert embeddings["properties"]["encoding_format"]["enum"] == ["float", "base64"]
    assert list(spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]) == ["application/json"]
    assert set(response_schema(spec, "/v1/embeddings")["properties"]) == {"object", "data", "model", "usage"}
    assert set(response_schema(spec, "/v1/models", "get")["properties"]) == {"object", "data"}
    assert "recall_at_10" in response_schema(spec, "/healthz", "get")["properties"]

    # errors are declared in the server's one shape, and no 422 that the server never sends
    error = spec["paths"]["/search"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert set(resolve(spec, resolve(spec, error)["properties"]["error"])["properties"]) == {"code", "type", "message"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
            ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" in ref:
                resolve(spec, ref)  # every referenced component exists


def test_the_openapi_document_is_valid(client):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(client.get("/openapi.json").json())


def test_the_declared_models_are_what_the_routes_validate_with(client):
    """The body schema says ``k`` is at most 100 and extra fields are refused: so does the route;
    the server's own max_k (20 here) is checked after it."""

    def form(**fields):  # multipart/form-data without a file
        return {name: (None, value) for name, value in fields.items()}

    def message(r):
        assert r.status_code == 400, r.text
        return r.json()["error"]["message"]

    assert "between 1 and 20" in message(client.post("/search", json={"text": "hat", "k": 101}))
    assert "between 1 and 20" in message(client.post("/search", json={"text": "hat", "k": 21}))
    assert "integer" in message(client.post("/search", json={"text": "hat", "k": True}))
    assert "unknown field(s) a, b" in message(client.post("/search", json={"text": "hat", "a": 1, "b": 2}))
    assert "unknown field(s) top_k" in message(client.post("/embed", json={"text": "hat", "top_k": 3}))
    assert "k must be an integer" in message(client.post("/search", files=form(text="hat", k="many")))
    assert "image must be a base64 string" in message(client.post("/embed", json={"image": 5}))
    ok = client.post("/search", files=form(text="hat", k="2", other="ignored"))
    assert ok.status_code == 200 and ok.json()["query"]["k"] == 2
    assert client.post("/embed", json={"text": "hat", "k": 3}).status_code == 200  # k accepted, ignored


def test_docs_page_has_a_csp_its_scripts_pass(client):
    r = client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = dict(
        (part.split()[0], part.split()[1:]) for part in r.headers["content-security-policy"].split(";") if part.strip()
    )
    assert csp["default-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert csp["connect-src"] == ["'self'"]  # the page fetches /openapi.json, and "Try it out" only here
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    inline = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    assert inline and "/openapi.json" in inline[0]
    for script in inline:  # each inline script runs by its hash
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["script-src"]
    for src in re.findall(r'<script src="([^"]+)"', r.text):  # each external script's origin is allowed
        assert any(src.startswith(origin + "/") for origin in csp["script-src"] if origin.startswith("https://"))
    for href in re.findall(r'<link type="text/css" rel="stylesheet" href="([^"]+)"', r.text):
        assert any(href.startswith(origin + "/") for origin in csp["style-src"] if origin.startswith("https://"))
    # everything else keeps the strict policy
    assert (
        client.get("/openapi.json").headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    )


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_are_labelled_by_route_template_and_group_unknown_paths(served_index):
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder)) as c:
        assert c.post("/search", json={"text": "hat", "k": 2}).status_code == 200
        assert c.get("/products/red-bag").status_code == 200
        assert c.get("/products/blue-bag").status_code == 200
        assert c.get("/products/nope").status_code == 404
        for i in range(5):
            assert c.get(f"/no-such-page-{i}").status_code == 404
        assert c.get("/openapi.json").status_code == 200
        got = samples(c)

    def value(name, **labels):
        matches = [s.value for s in got if s.name == name and s.labels == labels]
        assert len(matches) == 1, (name, labels, matches)
        return matches[0]

    assert value("moon_requests_total", route="/search", method="POST", status="200") == 1
    assert value("moon_requests_total", route="/products/{product_id}", method="GET", status="200") == 2
    assert value("moon_requests_total", route="/products/{product_id}", method="GET", status="404") == 1
    assert value("moon_requests_total", route="(unmatched)", method="GET", status="404") == 5
    assert value("moon_requests_total", route="/openapi.json", method="GET", status="200") == 1
    routes = {s.labels["route"] for s in got if s.name == "moon_requests_total"}
    assert not any("no-such-page" in r or "red-bag" in r for r in routes), routes  # never the raw URL

    search = {"route": "/search", "method": "POST", "status": "200"}
    buckets = {
        s.labels["le"]: s.value
        for s in got
        if s.name == "moon_request_seconds_bucket" and s.labels.items() >= search.items()
    }
    assert {"0.005", "0.1", "1.0", "30.0", "+Inf"} <= set(buckets) and buckets["+Inf"] == 1
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert value("moon_request_seconds_count", **search) == 1
    assert value("moon_request_seconds_sum", **search) > 0

    assert value("moon_batch_size_count") == 1 and value("moon_batch_size_sum") == 1
    batch_buckets = {s.labels["le"]: s.value for s in got if s.name == "moon_batch_size_bucket"}
    assert batch_buckets["1.0"] == 1 and batch_buckets["+Inf"] == 1
    assert value("moon_batch_queue_depth") == 0 and value("moon_batch_largest") == 1
    assert value("moon_index_products") == 12 and value("moon_uptime_seconds") >= 0


def test_each_app_counts_in_its_own_registry(served_index):
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder)) as a, TestClient(create_app(index_dir, embedder)) as b:
        for _ in range(3):
            a.get("/healthz")
        b.get("/healthz")

        def health(c):
            return [s.value for s in samples(c) if s.name == "moon_requests_total" and s.labels["route"] == "/healthz"]

        assert health(a) == [3] and health(b) == [1]
