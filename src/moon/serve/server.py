"""The uvicorn HTTP protocol of ``moon serve``: slow clients, connection floods and ambiguous framing.

uvicorn's own h11 protocol has no limit on how long a client may take to send a request (only an
idle keep-alive timeout *after* a response), no limit on open connections that gives way to real
requests, and it accepts ``Transfer-Encoding: chunked`` together with ``Content-Length``.
:func:`protocol_class` subclasses it with:

- **a read deadline**: a request's headers *and* body must arrive within
  ``ServeLimits.read_timeout_s`` of the moment the server starts waiting for it (the connection
  opening, or the previous response ending). Past it the connection is closed, after a JSON 408
  when part of the request had arrived and no response was started (a connection that sent
  nothing is closed silently, like an idle keep-alive one). The app's pending ``receive()`` then
  sees ``http.disconnect``.
- **a connection limit**: at most ``ServeLimits.max_connections`` connections are kept. A new
  one beyond it takes the place of the connection that has waited longest without a request in
  progress (idle, or still sending its headers: it is closed as above); when every open
  connection has a request in progress (its headers complete, the app working on it), the new
  connection is answered a JSON 503 at once and closed. So a flood of idle or trickling
  connections never keeps ``/healthz`` from answering. This is not the model-call limit
  (``ServeLimits.concurrency``), which queues requests inside the app.
- **strict framing**: a request with both ``Transfer-Encoding`` and ``Content-Length`` is
  refused with a JSON 400 before any body byte is read, and the connection closed (request
  smuggling); a ``Transfer-Encoding`` other than ``chunked`` is a JSON 501, other malformed
  requests a JSON 400 (431 for headers over the 64 KiB limit), always with the connection closed.

Every response written here carries the security headers of :mod:`moon.serve.headers`.
"""

from __future__ import annotations

import asyncio
import json
import time
from http import HTTPStatus
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from moon.serve.errors import error_body
from moon.serve.headers import secure_headers
from moon.serve.limits import ServeLimits

#: the largest request head (request line + headers) h11 buffers before refusing it (431)
MAX_HEAD_BYTES = 64 * 1024
#: seconds an idle keep-alive connection is kept after a response
KEEP_ALIVE_S = 5


def error_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response: the JSON error body, ``Connection: close``, security headers."""
    body = json.dumps(error_body(status, message)).encode()
    headers = secure_headers(
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
    )
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    head = f"HTTP/1.1 {status} {reason}\r\n".encode() + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + body


class _StrictConnection(h11.Connection):
    """h11's connection that refuses ``Transfer-Encoding`` + ``Content-Length`` and a request
    head over ``max_head`` bytes even when it arrived whole (h11 limits only an incomplete one),
    keeps the last protocol error (for its status and message) and tells the protocol about
    request events."""

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_head)
        self.max_head = max_head
        self.refusal: h11.RemoteProtocolError | None = None
        self.on_event = lambda event: None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}
            head = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if head > self.max_head:
                self.refusal = h11.RemoteProtocolError(
                    f"the request head is over the limit of {self.max_head:,} bytes", error_status_hint=431
                )
                raise self.refusal
            if b"transfer-encoding" in names and b"content-length" in names:
                self.refusal = h11.RemoteProtocolError(
                    "the request has both Transfer-Encoding and Content-Length (ambiguous framing, "
                    "as used for request smuggling); send one of them",
                    error_status_hint=400,
                )
                raise self.refusal
        self.on_event(event)
        return event


class MoonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the read deadline, connection limit and strict framing above.
    Use :func:`protocol_class` to bind it to a :class:`ServeLimits`."""

    limits: ServeLimits = ServeLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        self.conn = _StrictConnection(DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if size is None else size)
        self.conn.on_event = self._on_event
        self._read_timer: asyncio.TimerHandle | None = None
        self._waiting_since = time.monotonic()
        self._partial = False  # a byte of the awaited request has arrived
        self._in_request = False  # its headers are complete: the app has it

    # the read deadline -------------------------------------------------------------------------
    def _start_waiting(self) -> None:
        """The server now waits for a request: (re)start its read deadline."""
        self._cancel_read_timer()
        self._waiting_since = time.monotonic()
        self._partial = False
        self._in_request = False
        self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _on_event(self, event: Any) -> None:
        if isinstance(event, h11.Request):
            self._in_request = True
        elif isinstance(event, h11.EndOfMessage):
            if self.conn.our_state is h11.DONE:
                self._start_waiting()  # the body of an answered request: uvicorn starts the next cycle
            else:
                self._cancel_read_timer()  # the whole request is in; the app's time is --timeout

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        what = "body" if self._in_request else "headers"
        message = f"the request {what} did not arrive within the {self.limits.read_timeout_s:g} s read timeout"
        cycle = self.cycle if self._in_request else None
        if cycle is None and not self._partial:
            self._close()  # nothing of a request arrived: close as an idle keep-alive connection
            return
        self.logger.warning("%s; closing the connection", message)
        if cycle is not None and cycle.response_started:
            self._close()  # a response is under way: nothing more can be said
        else:
            self._refuse(408, message)

    # the connection limit -------------------------------------------------------------------------
    def _make_room(self) -> None:
        live = [c for c in self.connections if c is not self and not c.transport.is_closing()]
        if len(live) < self.limits.max_connections:
            return
        idle = [c for c in live if isinstance(c, MoonH11Protocol) and not c._in_request]
        if idle:
            oldest = min(idle, key=lambda c: c._waiting_since)
            oldest.logger.warning("%d connections open: closing the one waiting longest", len(live) + 1)
            if oldest._partial:
                oldest._refuse(503, "the server is at its connection limit; this unfinished request was dropped")
            else:
                oldest._close()
        else:
            self._refuse(
                503,
                f"the server is at its limit of {self.limits.max_connections} connections, "
                "each with a request in progress; try again shortly",
            )

    # writing and closing ------------------------------------------------------------------------
    def _close(self) -> None:
        self._cancel_read_timer()
        self._unset_keepalive_if_required()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's sends are dropped, its receive() ends
            self.cycle.message_event.set()
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Write a JSON error response and close the connection."""
        if not self.transport.is_closing():
            self.transport.write(error_response(status, message))
        self._close()

    # uvicorn's protocol interface ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_waiting()
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if data and not self._in_request:
            self._partial = True
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 (or :class:`_StrictConnection`) refused: here JSON,
        with h11's status (400, 431 for an over-long head, 501 for an unknown transfer coding)."""
        refusal = self.conn.refusal
        status = refusal.error_status_hint if refusal is not None else 400
        message = str(refusal) if refusal is not None else msg
        self.logger.warning("refused a request: %s", message)
        self._refuse(status, f"bad request framing: {message}" if status == 400 else message)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing() and self.conn.their_state is h11.DONE:
            self._start_waiting()
        super().on_response_complete()

    def timeout_keep_alive_handler(self) -> None:
        self._cancel_read_timer()
        super().timeout_keep_alive_handler()


def protocol_class(limits: ServeLimits) -> type[MoonH11Protocol]:
    """:class:`MoonH11Protocol` bound to ``limits`` (uvicorn instantiates it per connection)."""
    return type("MoonH11Protocol", (MoonH11Protocol,), {"limits": limits})


def server_options(limits: ServeLimits) -> dict[str, Any]:
    """The ``uvicorn.run`` / ``uvicorn.Config`` keyword arguments that apply ``limits``."""
    return {
        "http": protocol_class(limits),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
    }
