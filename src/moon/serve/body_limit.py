"""ASGI middleware that refuses request bodies over a byte limit with a JSON 413."""

from __future__ import annotations

import json
from typing import Any

from moon.serve.errors import error_body


class BodyTooLarge(Exception):
    pass


def _json_413(limit: int) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps(error_body(413, f"request body exceeds the limit of {limit:,} bytes")).encode()
    start = {
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class BodySizeLimit:
    """Checks ``Content-Length`` up front and counts streamed bytes (chunked uploads) as they arrive."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    start, body = _json_413(self.max_bytes)
                    await send(start)
                    await send(body)
                    return None
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            start, body = _json_413(self.max_bytes)
            await send(start)
            await send(body)
        return None
