"""The one JSON error shape of ``moon serve``: ``{"error": {"code", "type", "message"}}``.

Every error the server sends -- from a route, from the body-size limit, from the server protocol
(408, 503, refused framing) -- has this body. ``code`` is the HTTP status (an integer), ``type``
is OpenAI's error type (``invalid_request_error`` for a 4xx, ``server_error`` for a 5xx) and
``message`` says what was wrong. So it carries the three keys of OpenAI's error object, and the
``openai`` client reads ``message`` and ``type`` from it; ``code`` stays the HTTP status (OpenAI
sends a string code such as ``model_not_found`` or ``null`` there) so existing clients keep working.
"""

from __future__ import annotations

from typing import Any


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """The JSON body of an error response with HTTP status ``status``."""
    return {"error": {"code": status, "type": error_type(status), "message": message}}
