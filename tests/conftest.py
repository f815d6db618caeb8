"""Fixtures shared across test packages (helpers are fixtures, so no test imports another)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest


def _release(fifo: os.PathLike | str) -> None:
    """Let a reader blocked in ``open(fifo)`` go on (it then reads end-of-file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody is waiting on it
        pass


def _within(seconds: float, fn: Callable[[], Any], *fifos: os.PathLike | str) -> Any:
    """``fn()``'s result, or its exception re-raised; fails the test if it runs longer than
    ``seconds`` (a hang: a FIFO read, a lock never released), after releasing ``fifos`` so that
    the blocked thread ends."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=seconds)
    if t.is_alive():
        for fifo in fifos:
            _release(fifo)
        t.join(5)
        pytest.fail(f"still running after {seconds} s (blocked? a FIFO or device hangs the reader)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def within() -> Callable[..., Any]:
    """``within(seconds, fn, *fifos)``: run ``fn`` in a thread and return its result (or raise its
    exception); fail the test if it does not finish in time, releasing ``fifos`` first."""
    return _within


@pytest.fixture
def one_line_cli_error(capsys) -> Callable[[list[str]], str]:
    """``one_line_cli_error(argv)``: run ``moon ARGV``, assert exit 2 with exactly one ``error: …``
    line on stderr and no traceback; returns that line."""
    from moon.cli import main

    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    return run
