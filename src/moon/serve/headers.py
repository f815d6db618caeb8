"""Security headers on every response: no framing, no MIME sniffing.

Every response says ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and carries a
``Content-Security-Policy`` with ``frame-ancestors 'none'``: a policy the route set (the search
page's, an image's) gets the directive added; a response without one gets ``default-src 'none';
frame-ancestors 'none'`` (JSON, text and images load nothing). :class:`SecurityHeaders` applies
this to the app's responses; :func:`secure_headers` is also used for the responses the server
protocol writes itself (408, 503, 400 for refused framing).
"""

from __future__ import annotations

FRAME_ANCESTORS = b"frame-ancestors 'none'"
DEFAULT_CSP = b"default-src 'none'; " + FRAME_ANCESTORS


def secure_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` (lower-case names) with the security headers added; existing ones are kept,
    and an existing CSP without a ``frame-ancestors`` directive gets ``frame-ancestors 'none'``."""
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for name, value in headers:
        name = name.lower()
        if name == b"content-security-policy" and b"frame-ancestors" not in value.lower():
            value = value.rstrip().rstrip(b";").rstrip() + b"; " + FRAME_ANCESTORS
        seen.add(name)
        out.append((name, value))
    if b"content-security-policy" not in seen:
        out.append((b"content-security-policy", DEFAULT_CSP))
    if b"x-frame-options" not in seen:
        out.append((b"x-frame-options", b"DENY"))
    if b"x-content-type-options" not in seen:
        out.append((b"x-content-type-options", b"nosniff"))
    return out


class SecurityHeaders:
    """ASGI middleware: :func:`secure_headers` on every HTTP response start."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": secure_headers(list(message.get("headers", [])))}
            await send(message)

        return await self.app(scope, receive, secured_send)
