"""The declared request and response bodies of ``moon serve``'s own routes (pydantic v2).

The OpenAI-compatible bodies live beside their routes, in :mod:`moon.serve.openai_api`. The
request models are what the routes validate with (:func:`validation_message` turns the first
problem into the one-line message of a 400), and the response models are the routes'
``response_model``: both are what ``GET /openapi.json`` declares.

``POST /search`` and ``POST /embed`` take a JSON body (:class:`SearchRequest`,
:class:`EmbedRequest`) or a multipart form with the same fields, the image then a file upload
(:func:`multipart_schema` derives the form's schema from the JSON model).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, ValidationError


def _no_bool(value: Any) -> Any:
    # pydantic's lax int takes true/false as 1/0; a k of true is a mistake, not a number
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    return value


#: the hard ceiling of ``k`` (``ServeLimits.max_k`` may set a lower one per server)
K_CEILING = 100


# -- requests --------------------------------------------------------------------------------
class EmbedRequest(BaseModel):
    """``POST /embed``: a query text, an image, or both."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = Field(
        None, description="the query text (stripped; at most the server's max_text_chars characters)"
    )
    image: StrictStr | None = Field(
        None, description="the query image, base64 (optionally a data: URL); a file upload in a multipart form"
    )
    k: int | None = Field(None, description="accepted and ignored, so a /search body can be sent as is")


class SearchRequest(EmbedRequest):
    """``POST /search``: a query text, an image, or both, and the number of results."""

    k: Annotated[int, BeforeValidator(_no_bool)] = Field(
        10, ge=1, le=K_CEILING, description="results to return (at most the server's max_k)"
    )


def multipart_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of ``model`` as a multipart form: ``image`` a file upload, every other
    field as declared."""
    schema = model.model_json_schema()
    schema["properties"]["image"] = {
        "type": "string",
        "format": "binary",
        "title": "Image",
        "description": "the query image, an uploaded file",
    }
    schema.pop("additionalProperties", None)  # a form's other fields are ignored
    schema["title"] = f"{model.__name__}Form"
    return schema


def validation_message(exc: ValidationError, max_k: int) -> str:
    """One line for the first problem of a body that does not fit :class:`SearchRequest` or
    :class:`EmbedRequest` (the fields of a request with unknown fields are all named)."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and e["loc"])
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}; expected text, image (base64), k"
    first = errors[0] if errors else {}
    field = str(first.get("loc", ("body",))[0]) if first.get("loc") else "body"
    if field == "k":
        value = first.get("input")
        if first.get("type") in ("greater_than_equal", "less_than_equal"):
            return f"k must be between 1 and {max_k}, got {value}"
        return f"k must be an integer, got {value!r}"
    if field == "text":
        return "text must be a string"
    if field == "image":
        return "image must be a base64 string (optionally a data: URL)"
    return f"{field}: {first.get('msg', 'invalid request')}"


# -- responses -------------------------------------------------------------------------------
class QueryInfo(BaseModel):
    """The query as the server read it."""

    text: str | None
    images: int = Field(description="images in the query (0 or 1)")
    modality: Literal["text", "image", "multimodal"]
    k: int


class SearchResult(BaseModel):
    """One ranked product."""

    rank: int = Field(description="1 for the nearest product")
    id: str
    score: float = Field(description="similarity to the query (higher is nearer)")
    title: str = Field(description='the product title ("" when the store lacks the id)')
    image_url: str | None = Field(description="the product's first image, or null when it has none")
    product_url: str


class SearchResponse(BaseModel):
    """``POST /search``."""

    query: QueryInfo
    took_ms: float = Field(description="milliseconds spent encoding and searching")
    results: list[SearchResult]


class EmbedResponse(BaseModel):
    """``POST /embed``: the query vector (L2-normalised, in the index's space)."""

    model: str
    fingerprint: str = Field(description="the model fingerprint the index was built with")
    dim: int
    embedding: list[float]


class ProductResponse(BaseModel):
    """``GET /products/{product_id}``."""

    id: str
    title: str
    category: list[str]
    attributes: dict[str, list[str]]
    group: str | None
    images: list[str] = Field(description="URLs of the product's images on this server")
    indexed: bool = Field(description="whether the product is in the served index")


class HealthResponse(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok"]
    version: str
    products: int = Field(description="vectors in the index")
    kind: str = Field(description="the index kind (exact, hnsw, ivfpq)")
    model: str
    dim: int
    recall_at_10: float | None = Field(description="Recall@10 measured when the index was built, if measured")


class ErrorDetail(BaseModel):
    code: int = Field(description="the HTTP status")
    type: Literal["invalid_request_error", "server_error"]
    message: str


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"code", "type", "message"}}`` (:mod:`moon.serve.errors`)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering errors ``statuses`` (each an :class:`ErrorResponse`)."""
    return {status: {"model": ErrorResponse, "description": _ERROR_TEXT.get(status, "error")} for status in statuses}


_ERROR_TEXT = {
    400: "malformed request",
    403: "refused",
    404: "not found",
    413: "body, image or pixel count over the limit",
    415: "unsupported content type",
    503: "the queue is full (with Retry-After)",
    504: "the request took longer than the timeout",
}
