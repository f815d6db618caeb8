"""Slow clients, connection floods, ambiguous framing, frame headers and bad numeric options of
``moon serve``: driven over real sockets against uvicorn with moon's protocol
(:mod:`moon.serve.server`). Time bounds are generous upper bounds that prove "does not hang"."""

from __future__ import annotations

import json
import math
import select
import socket
import time

import pytest
from fastapi.testclient import TestClient

from moon.errors import ConfigError
from moon.serve import ServeLimits, create_app

#: the server's read timeout in these tests; a stalled client must be dropped well within
#: READ_TIMEOUT + SLACK seconds
READ_TIMEOUT = 1.0
SLACK = 5.0


@pytest.fixture
def server(served_index, start_server):
    """A live server with a 1 s read timeout and room for 4 connections."""
    index_dir, _, embedder = served_index
    limits = ServeLimits(read_timeout_s=READ_TIMEOUT, max_connections=4, timeout_s=20)
    return start_server(create_app(index_dir, embedder, limits=limits), limits)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + SLACK)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection: ``(data, closed)``; ``closed``
    is False when it was still open after READ_TIMEOUT + SLACK seconds."""
    data = b""
    deadline = time.monotonic() + READ_TIMEOUT + SLACK
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _json_error(raw: bytes, status: int) -> str:
    got, headers, body = _parse(raw)
    assert got == status, raw
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert b"\n" not in body  # one line
    error = json.loads(body)["error"]
    assert error["code"] == status and error["message"]
    _assert_frame_headers(headers)
    return error["message"]


def _assert_frame_headers(headers) -> None:
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


def _get(port: int, path: str = "/healthz") -> tuple[int, dict[str, str], bytes]:
    with _connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        raw, closed = _read_until_closed(sock)
    assert closed, raw
    return _parse(raw)


# slow clients -------------------------------------------------------------------------------------


def test_half_the_headers_then_a_stall_is_a_408_and_closed(server):
    with _connect(server.port) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        raw, closed = _read_until_closed(sock)
    assert closed and time.monotonic() - start < READ_TIMEOUT + SLACK
    assert "headers did not arrive within the 1 s read timeout" in _json_error(raw, 408)


def test_headers_sent_byte_by_byte_past_the_deadline_are_cut_off(server):
    """The deadline is for the whole request, not per byte: a trickle does not reset it."""
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"
    with _connect(server.port) as sock:
        start = time.monotonic()
        sent = 0
        try:
            while sent < len(request) and time.monotonic() - start < READ_TIMEOUT + SLACK:
                sock.sendall(request[sent : sent + 1])
                sent += 1
                time.sleep(0.05)  # 200+ bytes at 20 bytes/s: far past the 1 s deadline
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw, closed = _read_until_closed(sock)
    assert closed and sent < len(request)
    assert time.monotonic() - start < READ_TIMEOUT + SLACK + 1
    assert raw.startswith(b"HTTP/1.1 408 ")


def test_a_body_that_stops_after_10_of_100_bytes_is_a_408_and_closed(server):
    with _connect(server.port) as sock:
        start = time.monotonic()
        sock.sendall(
            b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"text": "'
        )
        raw, closed = _read_until_closed(sock)
    assert closed and time.monotonic() - start < READ_TIMEOUT + SLACK
    assert "body did not arrive" in _json_error(raw, 408)
    assert _get(server.port)[0] == 200  # the server is fine afterwards


def test_a_connection_that_sends_nothing_is_closed(server):
    with _connect(server.port) as sock:
        start = time.monotonic()
        raw, closed = _read_until_closed(sock)
    assert closed and raw == b"" and time.monotonic() - start < READ_TIMEOUT + SLACK


def test_the_read_deadline_does_not_cut_short_a_slow_search_or_keep_alive(server, monkeypatch):
    import moon.serve.app as app_module

    real = app_module.nearest_products

    def slow_search(*args, **kwargs):
        time.sleep(READ_TIMEOUT + 0.5)  # the model is slower than the read timeout, not the client
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "nearest_products", slow_search)
    body = b'{"text": "red shoe", "k": 2}'
    request = (
        b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with _connect(server.port) as sock:
        sock.sendall(request + request)  # two requests, pipelined on one keep-alive connection
        raw, _ = _read_until_closed(sock)
    assert raw.count(b"HTTP/1.1 200 ") == 2, raw
    assert raw.count(b'"id":"red-shoe"') == 2


# connection limit ---------------------------------------------------------------------------------


def test_healthz_answers_while_more_idle_connections_than_the_limit_are_open(served_index, start_server):
    index_dir, _, embedder = served_index
    limits = ServeLimits(read_timeout_s=30, max_connections=4)  # idle ones are not dropped by time here
    server = start_server(create_app(index_dir, embedder, limits=limits), limits)
    idle = [_connect(server.port) for _ in range(6)]
    trickling = [_connect(server.port) for _ in range(6)]
    for sock in trickling:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")  # headers begun, never finished
    try:
        for _ in range(3):
            status, headers, body = _get(server.port)
            assert status == 200 and json.loads(body)["status"] == "ok"
            _assert_frame_headers(headers)
        flood = idle + trickling
        readable, _, _ = select.select(flood, [], [], SLACK)
        # every connection beyond the limit was closed to make room (a trickling one with a 503)
        assert len(readable) >= len(flood) - limits.max_connections
        for sock in readable:
            raw, closed = _read_until_closed(sock)
            assert closed and (raw == b"" or raw.startswith(b"HTTP/1.1 503 ")), raw
    finally:
        for sock in idle + trickling:
            sock.close()


def test_a_new_connection_gets_a_503_when_every_connection_has_a_request_in_progress(served_index, start_server):
    index_dir, _, embedder = served_index
    limits = ServeLimits(read_timeout_s=30, max_connections=2)
    server = start_server(create_app(index_dir, embedder, limits=limits), limits)
    busy = [_connect(server.port) for _ in range(2)]
    try:
        for sock in busy:  # headers complete, body pending: the app is reading these requests
            sock.sendall(
                b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            )
        deadline = time.monotonic() + SLACK
        while sum(getattr(c, "_in_request", False) for c in list(server.server_state.connections)) < 2:
            assert time.monotonic() < deadline, "the server did not see both requests"
            time.sleep(0.02)
        with _connect(server.port) as sock:
            start = time.monotonic()
            raw, closed = _read_until_closed(sock)  # answered before it even sends a request
        assert closed and time.monotonic() - start < SLACK
        assert "limit of 2 connections" in _json_error(raw, 503)
    finally:
        for sock in busy:
            sock.close()
    deadline = time.monotonic() + SLACK
    while len(server.server_state.connections) > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _get(server.port)[0] == 200


# framing -------------------------------------------------------------------------------------------

SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\ntransfer-encoding: CHUNKED\r\n",
    ],
    ids=["te-then-cl", "cl-then-te"],
)
def test_transfer_encoding_with_content_length_is_a_400_and_closed(server, framing):
    body = b"0\r\n\r\n"
    with _connect(server.port) as sock:
        sock.sendall(
            b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + framing
            + b"\r\n"
            + body
            + SMUGGLED
        )
        raw, closed = _read_until_closed(sock)
    assert closed
    assert "both Transfer-Encoding and Content-Length" in _json_error(raw, 400)
    assert raw.count(b"HTTP/1.1 ") == 1  # the smuggled request behind it was never answered


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"identity"])
def test_a_transfer_encoding_the_server_does_not_implement_is_a_501_and_closed(server, coding):
    with _connect(server.port) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: " + coding + b"\r\n\r\n" + SMUGGLED)
        raw, closed = _read_until_closed(sock)
    assert closed and raw.count(b"HTTP/1.1 ") == 1
    assert "Transfer-Encoding" in _json_error(raw, 501)


def test_chunked_alone_still_works(server):
    body = b'{"text": "green hat", "k": 1}'
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    with _connect(server.port) as sock:
        sock.sendall(
            b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked
        )
        raw, closed = _read_until_closed(sock)
    status, _, response = _parse(raw)
    assert closed and status == 200 and json.loads(response)["results"][0]["id"] == "green-hat"


# frame headers -------------------------------------------------------------------------------------


def test_every_response_forbids_framing(served_index):
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder, limits=ServeLimits(max_body_bytes=1000))) as c:
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        csp = page.headers["content-security-policy"]
        assert csp.startswith("default-src 'self'; style-src 'self' 'unsafe-inline'")  # the page's own policy kept
        assert csp.endswith("; frame-ancestors 'none'") and csp.count("frame-ancestors") == 1
        health = c.get("/healthz")
        assert health.status_code == 200
        assert health.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        for response in (
            page,
            health,
            c.get("/metrics"),
            c.get("/nope"),  # 404
            c.put("/search"),  # 405
            c.post("/search", json={"text": "x" * 2000}),  # 413 from the body-limit middleware
            c.post("/search", json={"text": "hat", "k": 0}),  # 400
        ):
            _assert_frame_headers(response.headers)
            assert len(response.headers.get_list("x-frame-options")) == 1


def test_a_500_forbids_framing_too(served_index, monkeypatch):
    import moon.serve.app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "nearest_products", broken)
    index_dir, _, embedder = served_index
    with TestClient(create_app(index_dir, embedder), raise_server_exceptions=False) as c:
        r = c.post("/search", json={"text": "hat"})
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
    _assert_frame_headers(r.headers)


# numeric options ------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("--max-body-mb", "nan"),
    ("--max-body-mb", "inf"),
    ("--max-body-mb", "0"),
    ("--max-body-mb", "-1"),
    ("--max-body-mb", "1e308"),
    ("--max-body-mb", "lots"),
    ("--timeout", "inf"),
    ("--timeout", "nan"),
    ("--timeout", "0"),
    ("--timeout", "-5"),
    ("--timeout", "1e300"),
    ("--read-timeout", "inf"),
    ("--read-timeout", "nan"),
    ("--read-timeout", "0"),
    ("--read-timeout", "-1"),
    ("--port", "-1"),
    ("--port", "65536"),
    ("--port", "80.5"),
    ("--port", "http"),
    ("--concurrency", "0"),
    ("--concurrency", "-2"),
    ("--concurrency", "1.5"),
    ("--max-connections", "0"),
    ("--max-connections", "-1"),
    ("--max-connections", "nan"),
    ("--max-pixels", "0"),
    ("--max-pixels", "1e99"),
    ("--max-text", "0"),
    ("--max-text", "-10"),
    ("--max-k", "0"),
    ("--max-k", "101"),
    ("--max-batch", "0"),
    ("--max-batch", "4097"),
    ("--max-batch", "many"),
    ("--max-wait-ms", "nan"),
    ("--max-wait-ms", "-1"),
    ("--max-wait-ms", "1001"),
    ("--max-queue", "0"),
    ("--max-queue", "1.5"),
]


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_OPTIONS])
def test_a_bad_numeric_option_is_a_one_line_error(tmp_path, capsys, option, value):
    from moon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", str(tmp_path / "index"), option, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith(f"error: {option} must be ") and f"got {value!r}" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "field, value",
    [
        ("timeout_s", math.nan),
        ("timeout_s", math.inf),
        ("timeout_s", 0),
        ("timeout_s", -1.0),
        ("read_timeout_s", math.nan),
        ("read_timeout_s", math.inf),
        ("read_timeout_s", 0.0),
        ("max_body_bytes", math.nan),
        ("max_body_bytes", math.inf),
        ("max_body_bytes", 0),
        ("max_connections", 0),
        ("concurrency", -1),
        ("concurrency", 1.5),
        ("max_k", 101),
        ("max_pixels", True),
    ],
)
def test_serve_limits_refuse_bad_numbers(field, value):
    with pytest.raises(ConfigError, match=f"serve limit {field} must be"):
        ServeLimits(**{field: value})


def test_a_request_head_over_64_kib_is_a_431_and_closed(server):
    with _connect(server.port) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (80 * 1024) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw, closed = _read_until_closed(sock)
    assert closed
    _json_error(raw, 431)
