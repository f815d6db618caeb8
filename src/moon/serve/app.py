"""The HTTP API and search page over one index: ``create_app(index_dir) -> FastAPI``.

Routes: ``GET /`` (search page), ``POST /search``, ``POST /embed``, ``GET /products/{id}``,
``GET /products/{id}/image``, ``GET /healthz``, ``GET /metrics`` (:mod:`moon.serve.metrics`),
``GET /openapi.json`` and its Swagger UI page ``GET /docs``, and the OpenAI-compatible
``POST /v1/embeddings`` and ``GET /v1/models`` (:mod:`moon.serve.openai_api`). Request and
response bodies are the pydantic models of :mod:`moon.serve.schemas` (and of ``openai_api``). Every error is JSON
``{"error": {"code": <status>, "type": "...", "message": "..."}}`` (:mod:`moon.serve.errors`). Product ids are only ever dictionary keys;
image files are served from the record's path after checking it lies inside the store, and only
raster types (never SVG, which can carry script); every response says ``X-Content-Type-Options:
nosniff``, ``X-Frame-Options: DENY`` and has a CSP with ``frame-ancestors 'none'``
(:mod:`moon.serve.headers`). Slow clients, connection floods and ambiguous framing are handled by
the server protocol (:mod:`moon.serve.server`). Uploaded images are decoded in a worker thread inside the model-concurrency limit, so
decoding never blocks the event loop (health checks answer meanwhile) and at most ``concurrency``
images are decoded at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from moon import __version__
from moon.data import ImageLoadError, ProductStore, Query, load_image
from moon.data.safe_open import json_depth_exceeds
from moon.errors import MoonError
from moon.index import VectorIndex, check_embedder, index_store_dir, load_index_embedder
from moon.index.search import nearest_products
from moon.models import Embedder
from moon.serve.batching import Batcher, QueueFull
from moon.serve.body_limit import BodySizeLimit
from moon.serve.errors import error_body
from moon.serve.headers import SecurityHeaders, secure_headers
from moon.serve.limits import ServeLimits
from moon.serve.metrics import Metrics
from moon.serve.schemas import (
    EmbedRequest,
    EmbedResponse,
    HealthResponse,
    ProductResponse,
    QueryInfo,
    SearchRequest,
    SearchResponse,
    SearchResult,
    error_responses,
    multipart_schema,
    validation_message,
)

#: the only files ``/products/{id}/image`` serves: raster formats a browser cannot run script from
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
}
#: the description of ``/openapi.json``
OPENAPI_DESCRIPTION = (
    "Product search and query embeddings over one MOON index, and OpenAI-compatible embeddings "
    '(`/v1/embeddings`, `/v1/models`). Every error is JSON `{"error": {"code", "type", "message"}}`. '
    "See docs/serving.md."
)
#: the deepest JSON body accepted (a query is an object of three scalars)
MAX_JSON_DEPTH = 32


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


#: one query of a request: the query (text), its uploaded image's bytes or None, the image's name
QueryItem = tuple[Query, "bytes | None", str]


def header_pixels(image: bytes) -> int:
    """Width × height from an image's header, without decoding it (0 when it cannot be read: the
    decode then refuses it with the reason)."""
    try:
        with Image.open(io.BytesIO(image)) as img:
            return int(img.width) * int(img.height)
    except Exception:  # noqa: BLE001 - any unreadable header: the decode reports it
        return 0


def _error(status: int, message: str, extra: dict[str, str] | None = None) -> JSONResponse:
    # the security headers are set here too: a 500 leaves through Starlette's outermost error
    # middleware, outside SecurityHeaders
    headers = {name.decode(): value.decode() for name, value in secure_headers([])}
    headers.update(extra or {})
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def _product_urls(product_id: str, n_images: int) -> list[str]:
    base = f"/products/{quote(product_id, safe='')}/image"
    return [base if i == 0 else f"{base}?n={i}" for i in range(n_images)]


class _Service:
    """Index + model + store, with bounded model concurrency and a per-call deadline."""

    def __init__(
        self,
        index: VectorIndex,
        embedder: Embedder,
        store: ProductStore,
        limits: ServeLimits,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.index = index
        self.embedder = embedder
        self.store = store
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.concurrency)
        self.batcher: Batcher[list[QueryItem], tuple[list[Query], np.ndarray]] = Batcher(
            self._encode_groups,
            self.call,
            max_batch=limits.max_batch,
            max_wait_s=limits.max_wait_ms / 1000.0,
            max_queue=limits.max_queue,
            max_pixels=limits.max_pixels,
            on_batch=on_batch,
        )

    def _encode_groups(self, groups: list[list[QueryItem]]) -> list[tuple[list[Query], np.ndarray] | ApiError]:
        """One batch (in a worker thread, holding a model slot): each request's images decoded
        (a bad one fails that request alone), then every query of the batch in one
        ``encode_queries`` call; per request, its decoded queries and its rows."""
        decoded: list[list[Query] | ApiError] = []
        for group in groups:
            try:
                decoded.append(decode_images(group, self.limits))
            except ApiError as exc:
                decoded.append(exc)
        queries = [q for d in decoded if not isinstance(d, ApiError) for q in d]
        vectors = np.asarray(self.embedder.encode_queries(queries), dtype=np.float32) if queries else None
        out: list[tuple[list[Query], np.ndarray] | ApiError] = []
        row = 0
        for d in decoded:
            if isinstance(d, ApiError):
                out.append(d)
            else:
                out.append((d, vectors[row : row + len(d)]))  # type: ignore[index]
                row += len(d)
        return out

    async def embed_queries(self, items: list[QueryItem]) -> tuple[list[Query], np.ndarray]:
        """The queries of one request (images as uploaded bytes) decoded and encoded, batched with
        other requests' (:mod:`moon.serve.batching`); 503 with ``Retry-After`` when the queue is full."""
        pixels = sum(header_pixels(image) for _, image, _ in items if image is not None)
        try:
            return await self.batcher.submit(items, size=len(items), pixels=pixels)
        except QueueFull as exc:
            raise ApiError(
                503, f"the server is busy ({exc}); try again shortly", headers={"Retry-After": "1"}
            ) from None

    async def call(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` in a worker thread, holding one of ``concurrency`` slots;
        504 when it does not finish within the timeout."""
        deadline = time.monotonic() + self.limits.timeout_s

        def guarded():
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            try:
                if time.monotonic() > deadline:
                    raise TimeoutError
                return fn(*args, **kwargs)
            finally:
                self._slots.release()

        try:
            return await asyncio.wait_for(run_in_threadpool(guarded), timeout=self.limits.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(504, f"the request took longer than the {self.limits.timeout_s:g} s limit") from None


def _check_text(text: str, what: str = "text") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            400, f"{what} is not valid Unicode (a lone surrogate {text[exc.start]!r} at position {exc.start})"
        ) from None


def clean_text(text: Any, limits: ServeLimits, what: str = "text") -> str | None:
    """A query text checked (a string of valid Unicode, at most ``max_text_chars`` once stripped)
    and stripped; ``None`` when absent or blank. Raises :class:`ApiError` (400)."""
    if text is not None and not isinstance(text, str):
        raise ApiError(400, f"{what} must be a string")
    if text is not None:
        _check_text(text, what)
    text = (text or "").strip() or None
    if text is not None and len(text) > limits.max_text_chars:
        raise ApiError(400, f"{what} is {len(text):,} characters long; the limit is {limits.max_text_chars:,}")
    return text


async def read_json_body(request: Request) -> Any:
    """The request body parsed as JSON, refusing bodies nested deeper than ``MAX_JSON_DEPTH``
    (before parsing) and invalid JSON, with a 400. The body-size limit applies while reading."""
    body = await request.body()
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise ApiError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})") from None


def image_from_base64(raw: Any, what: str = "image") -> bytes:
    """The bytes of a base64 image (optionally a ``data:`` URL); 400 when it is not base64.
    Only decodes the base64: the image itself is decoded by :func:`decode_images`."""
    if not isinstance(raw, str):
        raise ApiError(400, f"{what} must be a base64 string (optionally a data: URL)")
    if raw.startswith("data:"):
        raw = raw.partition(",")[2]
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what} is not valid base64") from None


async def _read_query(
    request: Request, limits: ServeLimits, model: type[SearchRequest] | type[EmbedRequest]
) -> tuple[Query, int, bytes | None]:
    """Parse a JSON or multipart query of ``model`` (:class:`SearchRequest` or
    :class:`EmbedRequest`): text, image (base64 in JSON / file upload) and k.

    Both forms are validated with ``model`` (a multipart form's unknown fields are ignored, its
    image is the uploaded file). Returns ``(query without images, k, image bytes or None)``: the
    image is decoded later, by :func:`decode_images` inside the worker slot."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    image_bytes: bytes | None = None
    if ctype == "application/json":
        payload = await read_json_body(request)
        if not isinstance(payload, dict):
            raise ApiError(400, 'the JSON body must be an object like {"text": "red sneaker", "k": 10}')
        req = _validate(model, payload, limits)
        if req.image is not None:
            image_bytes = image_from_base64(req.image)
    elif ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except StarletteHTTPException as exc:
            raise ApiError(400, f"bad multipart form ({exc.detail})") from None
        fields: dict[str, Any] = {"text": form.get("text")}
        if model is SearchRequest and form.get("k"):
            fields["k"] = form.get("k")
        req = _validate(model, fields, limits)
        upload = form.get("image")
        if upload is not None and not isinstance(upload, str):
            image_bytes = await upload.read()
            if not image_bytes:
                image_bytes = None  # an empty file field: the browser sent no photo
        elif isinstance(upload, str) and upload:
            raise ApiError(400, "image must be a file upload")
    else:
        raise ApiError(
            415, f"unsupported content type {ctype or '(none)'!r}; send application/json or multipart/form-data"
        )

    text = clean_text(req.text, limits)
    k = req.k if isinstance(req, SearchRequest) else 0
    if isinstance(req, SearchRequest) and k > limits.max_k:
        raise ApiError(400, f"k must be between 1 and {limits.max_k}, got {k}")
    if text is None and image_bytes is None:
        raise ApiError(400, "give a query text, an image, or both")
    return Query(id="request", text=text, images=[]), k, image_bytes


def _validate(model: type[EmbedRequest], fields: dict[str, Any], limits: ServeLimits) -> EmbedRequest:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc, limits.max_k)) from None


def decode_images(items: list[tuple[Query, bytes | None, str]], limits: ServeLimits) -> list[Query]:
    """Each ``(query, image bytes or None, name)`` as ``query`` with its image decoded (call it in
    the worker thread; raises :class:`ApiError`). ``max_pixels`` bounds each image and all the
    images of one request together, so a request holds at most that many decoded pixels (plus
    one image being checked) whatever its number of images."""
    out: list[Query] = []
    total = 0
    for query, image_bytes, name in items:
        if image_bytes is None:
            out.append(query)
            continue
        try:
            image = load_image(image_bytes, max_pixels=limits.max_pixels, name=name)
        except ImageLoadError as exc:
            raise ApiError(413 if exc.reason.startswith("too large") else 400, str(exc)) from None
        total += image.width * image.height
        if total > limits.max_pixels:
            raise ApiError(
                413,
                f"the request's images have {total:,} pixels together; the limit is {limits.max_pixels:,} "
                "(width × height, summed over the images of one request)",
            )
        out.append(Query(id=query.id, text=query.text, images=[image]))
    return out


def create_app(
    index_dir: str | os.PathLike,
    embedder: Embedder | None = None,
    *,
    limits: ServeLimits | None = None,
    store_dir: str | os.PathLike | None = None,
) -> FastAPI:
    """The FastAPI app serving ``index_dir``.

    Args:
        index_dir: a directory written by :func:`moon.index.build_index`.
        embedder: the model (default: loaded from the manifest's spec); its fingerprint must
            match the index's.
        limits: request limits (:class:`ServeLimits` defaults).
        store_dir: the product store (default: the path recorded in the manifest).
    """
    limits = limits or ServeLimits()
    index = VectorIndex.open(index_dir)
    if embedder is None:
        embedder = load_index_embedder(index.manifest, index_dir=index_dir)
    else:
        check_embedder(index.manifest, embedder, where=str(index_dir))
    store = ProductStore(store_dir or index_store_dir(index.manifest, index_dir))
    store.product_ids()  # fail early on a broken store
    for product_id in index.ids()[:1]:  # build the id → row lookup once, before requests race for it
        try:
            store.product(product_id)
        except KeyError:
            pass
    metrics = Metrics()
    service = _Service(index, embedder, store, limits, on_batch=metrics.observe_batch)
    metrics.track(service.batcher)
    metrics.index_products.set(len(index))

    # /openapi.json and /docs are routes of their own below (openapi_route, docs_page): routes
    # like the others (so /metrics labels them), /docs with its own CSP
    app = FastAPI(title="MOON product search", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        # the client left, or the server protocol closed a request whose body was too slow (it
        # answered the 408 itself): nothing is sent; the status is what /metrics counts
        return _error(408, "the client closed the connection before sending the whole request")

    @app.exception_handler(MoonError)
    async def _moon_error(request: Request, exc: MoonError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # the matched route's path template (bounded), never the raw URL; None when unmatched
            route = getattr(request.scope.get("route"), "path", None)
            metrics.observe(route, request.method, status, time.perf_counter() - start)

    app.add_middleware(SecurityHeaders)  # added last: outermost, so it sees every response above

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("moon.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data: blob:"
            },
        )

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses=error_responses(400, 413, 415, 503, 504),
        openapi_extra=request_body_schema(SearchRequest),
    )
    async def search_route(request: Request) -> SearchResponse:
        query, k, image = await _read_query(request, limits, SearchRequest)
        start = time.perf_counter()
        queries, vectors = await service.embed_queries([(query, image, "uploaded image")])
        query = queries[0]
        hits = await service.call(nearest_products, service.index, vectors, k=k, store=service.store)
        results = []
        for hit in hits:
            try:
                n_images = len(service.store.product(hit.id).images)
            except KeyError:
                n_images = 0
            results.append(
                SearchResult(
                    rank=hit.rank,
                    id=hit.id,
                    score=float(hit.score),
                    title=hit.title,
                    image_url=_product_urls(hit.id, n_images)[0] if n_images else None,
                    product_url=f"/products/{quote(hit.id, safe='')}",
                )
            )
        return SearchResponse(
            query=QueryInfo(text=query.text, images=len(query.images), modality=query.modality, k=k),
            took_ms=round(1000 * (time.perf_counter() - start), 2),
            results=results,
        )

    @app.post(
        "/embed",
        response_model=EmbedResponse,
        responses=error_responses(400, 413, 415, 503, 504),
        openapi_extra=request_body_schema(EmbedRequest),
    )
    async def embed_route(request: Request) -> EmbedResponse:
        query, _, image = await _read_query(request, limits, EmbedRequest)
        _, vectors = await service.embed_queries([(query, image, "uploaded image")])
        vector = vectors[0]
        return EmbedResponse(
            model=service.index.manifest.model,
            fingerprint=service.index.manifest.fingerprint,
            dim=int(vector.shape[0]),
            embedding=vector.tolist(),
        )

    @app.get("/products/{product_id}", response_model=ProductResponse, responses=error_responses(404))
    async def product_route(product_id: str) -> ProductResponse:
        try:
            product = service.store.product(product_id)
        except KeyError:
            raise ApiError(404, f"no product with id {product_id!r}") from None
        return ProductResponse(
            id=product.id,
            title=product.title,
            category=product.category,
            attributes=product.attributes,
            group=product.group,
            images=_product_urls(product.id, len(product.images)),
            indexed=product.id in service.index,
        )

    @app.get(
        "/products/{product_id}/image",
        response_class=FileResponse,
        responses={
            200: {"content": {media: {} for media in sorted(set(IMAGE_TYPES.values()))}, "description": "the image"},
            **error_responses(400, 403, 404),
        },
    )
    async def product_image_route(product_id: str, n: int = 0) -> FileResponse:
        try:
            product = service.store.product(product_id)
        except KeyError:
            raise ApiError(404, f"no product with id {product_id!r}") from None
        if not 0 <= n < len(product.images):
            raise ApiError(404, f"product {product_id!r} has {len(product.images)} image(s); no image number {n}")
        path = Path(product.images[n]).resolve()
        root = service.store.root
        if root not in path.parents:
            raise ApiError(403, f"image {n} of product {product_id!r} lies outside the store; refusing to serve it")
        media_type = IMAGE_TYPES.get(path.suffix.lower())
        if media_type is None:
            raise ApiError(
                403,
                f"image {n} of product {product_id!r} is not a raster image type ({', '.join(sorted(IMAGE_TYPES))})",
            )
        if not path.is_file():
            raise ApiError(404, f"image {n} of product {product_id!r} is missing from the store")
        return FileResponse(
            path,
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=3600", "Content-Security-Policy": "default-src 'none'"},
        )

    from moon.serve.openai_api import add_openai_routes

    add_openai_routes(app, service)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        m = service.index.manifest
        return HealthResponse(
            status="ok",
            version=__version__,
            products=len(service.index),
            kind=m.kind,
            model=m.model,
            dim=m.dim,
            recall_at_10=m.recall_at_10,
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "the Prometheus text format"}},
    )
    async def metrics_route(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_route() -> JSONResponse:
        return JSONResponse(app.openapi())

    docs_html = get_swagger_ui_html(
        openapi_url="/openapi.json", title=f"{app.title} - API", swagger_favicon_url="data:,"
    ).body
    docs_csp = docs_policy(docs_html.decode("utf-8"))

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs_page() -> HTMLResponse:
        return HTMLResponse(docs_html, headers={"Content-Security-Policy": docs_csp})

    return app


#: the models a route validates its request body with itself (it takes the raw request, for its
#: multipart form or its JSON checks): declared in ``/openapi.json`` by :func:`request_body_schema`
def _request_models() -> list[type[BaseModel]]:
    from moon.serve.openai_api import EmbeddingRequest

    return [SearchRequest, EmbedRequest, EmbeddingRequest]


def request_body_schema(model: type[BaseModel], *, multipart: bool = True) -> dict[str, Any]:
    """The ``openapi_extra`` of a route validating its body with ``model``: JSON (and a multipart
    form, its image a file upload)."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if multipart:
        content["multipart/form-data"] = {"schema": multipart_schema(model)}
    return {"requestBody": {"required": True, "content": content}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the request models of :func:`_request_models` as components, and a
    validation error declared as what the server answers (a 400 in the error shape, not a 422)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=OPENAPI_DESCRIPTION,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema(
            [(model, "validation") for model in _request_models()], ref_template="#/components/schemas/{model}"
        )
        components.update(defs.get("$defs", {}))
        error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:  # the validation-error handler answers 400
                    responses.setdefault("400", {"description": "malformed request", "content": error_content})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def docs_policy(html: str) -> str:
    """The CSP of ``/docs`` (FastAPI's Swagger UI page): its script and stylesheet from the CDN it
    names (cdn.jsdelivr.net), its one inline script allowed by its SHA-256 (no 'unsafe-inline'
    script), inline styles (Swagger UI sets them), images from here and data: URLs (its icons),
    and fetches only to this server (``/openapi.json`` and "Try it out")."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src https://cdn.jsdelivr.net {hashes}; "
        "style-src https://cdn.jsdelivr.net 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'"
    )
