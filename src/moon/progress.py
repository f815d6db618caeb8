"""Progress for long loops that reads well in a terminal and in a log file alike, and warnings of
one kind counted and summarised instead of printed once per record.

``bar(total, desc)`` returns a tqdm bar when stderr is a terminal; otherwise (a log, a pipe, CI) a
:class:`LineProgress` that prints one plain line at most every 10 % and at least every 30 s while
the loop runs, and a ``done`` line at the end — no carriage returns, no ANSI escapes, no
nested-bar cursor codes::

    encode products: 120/1,200 (10%) 12 s, ~1 min 48 s left
    encode products: 1,200/1,200 done in 2 min 3 s (9.8 products/s)

``MOON_PROGRESS`` overrides the choice: ``bar`` (always tqdm), ``lines`` (always plain lines),
``off`` (nothing), ``auto`` (the default).

While a bar is open, warnings raised inside it are collected (unless ``summarize_warnings=False``)
and, when it closes, re-issued once per kind with a count: ``encode products: 244
TruncationWarnings like "p17: text has 700 tokens > max_text_tokens=512; shortened (title
first)"``. :func:`warnings_summary` does the same for any block. Filters set outside still apply
(an ``ignore`` drops the warning, an ``error`` raises at once).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

MODES = ("auto", "bar", "lines", "off")
_ENV = "MOON_PROGRESS"


def mode() -> str:
    """``bar``, ``lines`` or ``off``: what a new progress display is, from ``MOON_PROGRESS`` and stderr."""
    chosen = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if chosen not in MODES:
        chosen = "auto"
    if chosen == "auto":
        stream = sys.stderr
        return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "lines"
    return chosen


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class LineProgress:
    """A progress display for logs: plain lines, each complete, written to ``file`` (stderr).

    A line is written when the count crosses the next ``every_percent`` step (and at least
    ``min_seconds`` have passed since the last line), when ``every_seconds`` have passed since the
    last line, and once at :meth:`close`. With an unknown ``total`` only the time rule applies.
    Supports the part of tqdm's interface the library uses: ``update``, ``set_postfix``,
    ``set_postfix_str``, ``set_description``, ``close``, iteration and ``with``.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "it",
        initial: int = 0,
        file: IO[str] | None = None,
        every_percent: float = 10.0,
        every_seconds: float = 30.0,
        min_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        iterable: Iterable[Any] | None = None,
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.file = file
        self.every_percent = every_percent
        self.every_seconds = every_seconds
        self.min_seconds = min_seconds
        self.clock = clock
        self.iterable = iterable
        self.postfix = ""
        self.closed = False
        self.start = clock()
        self.last_line = self.start
        self._next_mark = self._mark_after(initial)

    def _mark_after(self, n: int) -> float:
        if not self.total:
            return float("inf")
        step = self.total * self.every_percent / 100
        return (int(n / step) + 1) * step if step > 0 else float("inf")

    def _write(self, text: str) -> None:
        stream = self.file if self.file is not None else sys.stderr
        if stream is None:
            return
        stream.write(text + "\n")
        stream.flush()

    def _count(self) -> str:
        if self.total:
            return f"{self.n:,}/{self.total:,}"
        return f"{self.n:,} {self.unit}"

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        parts = [f"{self.desc}: {self._count()}"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts.append(_duration(elapsed))
        done = self.n - self.initial
        if self.total and 0 < done and self.n < self.total:
            parts[-1] += f", ~{_duration(elapsed / done * (self.total - self.n))} left"
        text = " ".join(parts)
        return f"{text}  {self.postfix}" if self.postfix else text

    def update(self, n: int = 1) -> None:
        if self.closed:
            return
        self.n += n
        now = self.clock()
        since = now - self.last_line
        crossed = self.n >= self._next_mark
        if crossed:
            self._next_mark = self._mark_after(self.n)
        if self.total and self.n >= self.total:
            return  # the final line comes from close()
        if (crossed and since >= self.min_seconds) or since >= self.every_seconds:
            self._write(self._line(now))
            self.last_line = now

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        elapsed = now - self.start
        done = self.n - self.initial
        rate = f" ({done / elapsed:.1f} {self.unit}/s)" if elapsed > 0 and done > 0 else ""
        finished = self.total is None or self.n >= self.total
        head = f"{self.desc}: {self._count()} {'done' if finished else 'stopped'} in {_duration(elapsed)}{rate}"
        self._write(f"{head}  {self.postfix}" if self.postfix else head)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress display was not given an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent:
    """The ``off`` display: accepts every call, prints nothing."""

    def __init__(self, iterable: Iterable[Any] | None = None):
        self.iterable = iterable
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def set_postfix_str(self, *a: Any, **k: Any) -> None:
        pass

    def set_description(self, *a: Any, **k: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress display was not given an iterable")
        yield from self.iterable

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _WithWarnings:
    """Wraps a display so that closing it (or leaving its ``with``) also ends its warnings summary."""

    def __init__(self, inner: Any, summary: contextlib.ExitStack):
        self._inner = inner
        self._summary = summary

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._inner
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._summary.close()

    def __enter__(self) -> _WithWarnings:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a display dropped unclosed (an exception): do not leave showwarning patched
        with contextlib.suppress(Exception):
            self._summary.close()


def bar(
    total: int | None,
    desc: str,
    *,
    enabled: bool = True,
    unit: str = "it",
    initial: int = 0,
    iterable: Iterable[Any] | None = None,
    summarize_warnings: bool = True,
    **tqdm_kwargs: Any,
) -> Any:
    """A progress display for a loop of ``total`` items labelled ``desc`` (keep it short:
    ``"encode products"``, not a path).

    ``enabled=False`` shows nothing (warnings are still summarised). Use it like tqdm: ``with
    bar(n, "encode products") as b: … b.update(k)``, or iterate ``bar(len(xs), "tasks",
    iterable=xs)``; close it (or leave the ``with``) to print the last line and the warnings summary.
    """
    summary = contextlib.ExitStack()
    if summarize_warnings:
        summary.enter_context(warnings_summary(desc))
    chosen = mode() if enabled else "off"
    if chosen == "bar":
        from tqdm.auto import tqdm

        inner: Any = tqdm(
            iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, **tqdm_kwargs
        )
    elif chosen == "lines":
        inner = LineProgress(total, desc, unit=unit, initial=initial, iterable=iterable)
    else:
        inner = _Silent(iterable)
    return _WithWarnings(inner, summary) if summarize_warnings else inner


def track(iterable: Iterable[T], desc: str, *, total: int | None = None, enabled: bool = True, unit: str = "it") -> Any:
    """Iterate ``iterable`` with a :func:`bar` (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return bar(total, desc, enabled=enabled, unit=unit, iterable=iterable)


_RECORD_PREFIX = re.compile(r"^[^\s:]+: ")
_DIGITS = re.compile(r"\d+")


def _kind(w: warnings.WarningMessage) -> tuple[str, str]:
    """Warnings of one kind: same category, same message once a leading ``record-id: `` and all
    numbers are blanked out (``p17: text has 700 tokens`` ≡ ``p9: text has 52 tokens``)."""
    text = _DIGITS.sub("#", _RECORD_PREFIX.sub("", str(w.message), count=1))
    return w.category.__name__, text


class _Collector:
    """The warnings one open summary has caught so far: (warning, how many of its kind, label)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[tuple[warnings.WarningMessage, int, str]] = []


_lock = threading.Lock()
_local = threading.local()  # .stack: this thread's open summaries, innermost last
_installed = 0  # open summaries in all threads; showwarning is ours while > 0
_saved_showwarning: Any = None


def _stack() -> list[_Collector]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _collect(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    stack = _stack()
    if not stack:  # a warning of a thread without an open summary: shown as usual
        show = _saved_showwarning or warnings._showwarning_orig  # type: ignore[attr-defined]
        show(message, category, filename, lineno, file, line)
        return
    top = stack[-1]
    top.items.append((warnings.WarningMessage(message, category, filename, lineno, file, line), 1, top.what))


def _open(what: str) -> _Collector:
    global _installed, _saved_showwarning
    c = _Collector(what)
    with _lock:
        if _installed == 0:
            _saved_showwarning = warnings.showwarning
            warnings.showwarning = _collect
        _installed += 1
    _stack().append(c)
    return c


def _close(c: _Collector) -> None:
    global _installed, _saved_showwarning
    stack = _stack()
    if c in stack:
        stack.remove(c)
    with _lock:
        _installed -= 1
        if _installed == 0:
            if warnings.showwarning is _collect:
                warnings.showwarning = _saved_showwarning
            _saved_showwarning = None
    groups: dict[tuple[str, str], list[tuple[warnings.WarningMessage, int, str]]] = {}
    for item in c.items:
        groups.setdefault(_kind(item[0]), []).append(item)
    c.items = []
    for items in groups.values():
        first, _, what = items[0]
        count = sum(n for _, n, _ in items)
        if stack:  # an outer summary of this thread is open: it counts them on
            stack[-1].items.append((first, count, what))
            continue
        message: Warning | str = first.message
        if count > 1:
            message = f'{what}: {count:,} {first.category.__name__}s like "{first.message}"'
        warnings.warn_explicit(message, first.category, first.filename, first.lineno)  # filters apply again


@contextlib.contextmanager
def warnings_summary(what: str) -> Iterator[None]:
    """Collect the warnings shown while the block runs and re-issue them when it ends: a kind
    seen once as it was, a kind seen ``n > 1`` times once, as ``{what}: {n} {Category}s like
    "{first message}"``.

    Filters set outside still apply first (an ``ignore`` drops a warning, an ``error`` raises at
    once). Summaries nest: an inner one hands its counts to the outer one, and the outermost
    issues them, labelled by the innermost ``what`` that saw them; they may close in any order,
    and each thread has its own. The block leaves ``warnings.filters`` alone and replaces
    ``warnings.showwarning`` while any summary is open.
    """
    c = _open(what)
    try:
        yield
    finally:
        _close(c)
