"""Fixtures shared across test packages (helpers are fixtures, so no test imports another)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, or its exception re-raised; fails the test if it runs longer than
    ``seconds`` (a hang: a FIFO read, a lock never released)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=seconds)
    assert not t.is_alive(), f"still running after {seconds} s (blocked?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def within() -> Callable[[float, Callable[[], Any]], Any]:
    """``within(seconds, fn)``: run ``fn`` in a thread, fail the test if it does not finish in time."""
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
