"""OpenAI-compatible routes: ``POST /v1/embeddings`` and ``GET /v1/models``.

Inputs are *queries*: each goes through ``encode_queries``, as with ``POST /embed``, and through
the same checks (:func:`moon.serve.app.read_json_body`, :func:`~moon.serve.app.clean_text`,
:func:`~moon.serve.app.image_from_base64`, :func:`~moon.serve.app.decode_images`), inside the
same model-concurrency slots and timeout. ``input`` is a string, a list of strings, or a list of
items ``{"content": [parts]}`` whose parts are ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (at most one of
each: a text and an image make a multimodal query). Images are only taken inline as base64
``data:`` URLs: a remote URL is refused, never fetched.

``dimensions=d`` keeps the first ``d`` coordinates and L2-normalises them again. A model not
trained for that (no ``config.matryoshka_dim``) gets such requests refused unless the server
runs with ``ServeLimits(allow_truncation=True)``. ``encoding_format="base64"`` sends each vector
as base64 of its little-endian float32 bytes (what the ``openai`` client asks for by default).
See docs/serving.md, "OpenAI-compatible embeddings".
"""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from moon.data import Query
from moon.serve.app import ApiError, clean_text, image_from_base64, read_json_body, request_body_schema
from moon.serve.schemas import error_responses

#: the most inputs in one request (OpenAI's limit)
MAX_INPUTS = 2048
#: characters per token of the usage estimate when the model's tokenizer is not reachable
CHARS_PER_TOKEN = 4


# -- request ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: StrictStr
    detail: StrictStr | None = None  # OpenAI's chat field; accepted and ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class InputItem(_Strict):
    """One query given as content parts: a text, an image, or one of each (multimodal)."""

    content: list[ContentPart]


class EmbeddingRequest(_Strict):
    input: StrictStr | list[StrictStr | InputItem]
    model: StrictStr
    dimensions: StrictInt | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None  # OpenAI's end-user id; accepted and ignored


# -- response --------------------------------------------------------------------------------
class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moon"
    dim: int
    fingerprint: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- helpers ---------------------------------------------------------------------------------
INPUT_SHAPES = (
    'input must be a string, a list of strings, or a list of items {"content": [parts]} with parts '
    '{"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}} '
    "(token arrays are not supported)"
)


def _validation_message(exc: ValidationError) -> str:
    """One line naming the first problem of a request that does not fit :class:`EmbeddingRequest`."""
    errors = exc.errors()
    for error in errors:
        loc = error["loc"]
        # an input item that is an object, wrong inside: name the place (pydantic's union tags dropped)
        if loc[:1] == ("input",) and "InputItem" in loc[:-1] and len(loc) > 2 and isinstance(loc[2], int):
            tail = list(loc[loc.index("InputItem") + 1 :])
            if len(tail) >= 3 and tail[0] == "content" and isinstance(tail[1], int):
                tail = tail[:2] + tail[3:]  # the content part's type tag
            where = f"input[{loc[2]}]" + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in tail)
            return f"{where}: {error['msg']}"
    first = errors[0] if errors else {}
    loc = first.get("loc", ())
    if loc[:1] == ("input",) and first.get("type") != "missing":
        return INPUT_SHAPES
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    return f"{where or 'body'}: {first.get('msg', 'invalid request')}"


def truncation_trained(embedder: Any) -> bool:
    """Whether the model was trained to keep meaning in a prefix of its vector: a MOON config
    with ``matryoshka_dim``. An embedder without such a config is taken as not trained for it."""
    return bool(getattr(getattr(embedder, "config", None), "matryoshka_dim", None))


def served_model_id(service: Any) -> str:
    """The model name clients pass as ``model``: the index manifest's (as ``/embed`` and ``/healthz`` say)."""
    return service.index.manifest.model


def count_tokens(embedder: Any, texts: list[str]) -> int:
    """Tokens of ``texts`` by the model's tokenizer (``embedder.tokenizer.encode``, without special
    tokens or the query instruction); without a reachable tokenizer, ``ceil(chars / 4)`` per text.
    Images count no tokens."""
    tokenizer = getattr(embedder, "tokenizer", None)
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        try:
            return sum(len(encode(text, add_special_tokens=False)) for text in texts)
        except TypeError:
            pass
    return sum(math.ceil(len(text) / CHARS_PER_TOKEN) for text in texts)


def _parse_input(item: str | InputItem, i: int, limits: Any) -> tuple[Query, bytes | None, str]:
    """One input as ``(query without image, image bytes or None, image name)`` (raises :class:`ApiError`)."""
    where = f"input[{i}]"
    if isinstance(item, str):
        text = clean_text(item, limits, where)
        if text is None:
            raise ApiError(400, f"{where} is empty")
        return Query(id=f"input-{i}", text=text), None, where
    texts = [p for p in item.content if isinstance(p, TextPart)]
    images = [p for p in item.content if isinstance(p, ImagePart)]
    if len(texts) > 1 or len(images) > 1:
        raise ApiError(400, f"{where} has {len(texts)} text and {len(images)} image parts; give at most one of each")
    text = clean_text(texts[0].text, limits, f"{where} text") if texts else None
    image_bytes = None
    if images:
        url = images[0].image_url.url
        scheme = url.partition(":")[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            raise ApiError(
                400,
                f"{where}: remote image URLs are not fetched; send the image inline as a data URL "
                "(data:image/png;base64,...)",
            )
        if scheme != "data":
            raise ApiError(400, f"{where}: the image URL must be a data URL (data:image/png;base64,...)")
        head = url.partition(",")[0].lower()
        if not head.endswith(";base64"):
            raise ApiError(400, f"{where}: the image data URL must be base64 (data:image/png;base64,...)")
        image_bytes = image_from_base64(url, f"{where} image")
        if not image_bytes:
            raise ApiError(400, f"{where} image is empty")
    if text is None and image_bytes is None:
        raise ApiError(400, f"{where} is empty: give a text part, an image part, or both")
    return Query(id=f"input-{i}", text=text), image_bytes, f"{where} image"


def truncate(vectors: np.ndarray, d: int) -> np.ndarray:
    """The first ``d`` coordinates of each row, L2-normalised again (an all-zero prefix stays zero)."""
    cut = np.ascontiguousarray(vectors[:, :d], dtype=np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return np.divide(cut, norms, out=np.zeros_like(cut), where=norms > 0)


def encode_base64(vector: np.ndarray) -> str:
    """base64 of a vector's little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _created(manifest: Any) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(manifest.created).replace("Z", "+00:00")).timestamp())
    except (TypeError, ValueError):
        return 0


# -- routes ----------------------------------------------------------------------------------
def add_openai_routes(app: FastAPI, service: Any) -> None:
    """Add ``POST /v1/embeddings`` and ``GET /v1/models`` to ``app`` (``service``: the app's
    :class:`moon.serve.app._Service`)."""
    limits = service.limits

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=error_responses(400, 404, 413, 415, 503, 504),
        openapi_extra=request_body_schema(EmbeddingRequest, multipart=False),
    )
    async def embeddings_route(request: Request) -> EmbeddingResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}; send application/json")
        payload = await read_json_body(request)
        if not isinstance(payload, dict):
            raise ApiError(400, 'the JSON body must be an object like {"model": "...", "input": "red sneaker"}')
        try:
            req = EmbeddingRequest.model_validate(payload)
        except ValidationError as exc:
            raise ApiError(400, _validation_message(exc)) from None
        model_id = served_model_id(service)
        if req.model != model_id:
            raise ApiError(404, f"the model {req.model!r} does not exist here; this server serves {model_id!r}")
        dim = int(service.embedder.dim)
        if req.dimensions is not None:
            if not 1 <= req.dimensions <= dim:
                raise ApiError(
                    400, f"dimensions must be between 1 and {dim} (the model's dimension), got {req.dimensions}"
                )
            if req.dimensions < dim and not (limits.allow_truncation or truncation_trained(service.embedder)):
                raise ApiError(
                    400,
                    f"the model {model_id!r} was not trained for shortened vectors (no Matryoshka training), "
                    f"so dimensions={req.dimensions} < {dim} is refused; the operator can allow it with "
                    "`moon serve --allow-truncation`",
                )
        inputs = [req.input] if isinstance(req.input, str) else req.input
        if not inputs:
            raise ApiError(400, "input is an empty list; give at least one input")
        if len(inputs) > MAX_INPUTS:
            raise ApiError(400, f"input has {len(inputs):,} items; the limit is {MAX_INPUTS:,}")
        items = [_parse_input(item, i, limits) for i, item in enumerate(inputs)]
        queries, vectors = await service.embed_queries(items)
        tokens = count_tokens(service.embedder, [q.text for q in queries if q.text])
        if req.dimensions is not None and req.dimensions < vectors.shape[1]:
            vectors = truncate(vectors, req.dimensions)
        data = [
            EmbeddingData(index=i, embedding=encode_base64(v) if req.encoding_format == "base64" else v.tolist())
            for i, v in enumerate(vectors)
        ]
        return EmbeddingResponse(data=data, model=model_id, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    @app.get("/v1/models", response_model=ModelList)
    async def models_route() -> ModelList:
        manifest = service.index.manifest
        card = ModelCard(
            id=served_model_id(service),
            created=_created(manifest),
            dim=int(service.embedder.dim),
            fingerprint=manifest.fingerprint,
        )
        return ModelList(data=[card])
