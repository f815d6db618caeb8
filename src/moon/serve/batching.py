"""Dynamic batching: concurrent requests grouped into one model call.

Each request submits its *group* (the queries of one request, images still encoded as bytes) to a
:class:`Batcher`. The first group opens a batch. When no batch is being encoded, it runs at once (a
lone request pays no wait); while the model is busy, groups arriving within ``max_wait_s`` join it
until it holds ``max_batch`` queries or ``max_pixels`` image pixels (read from the image headers,
so a batch never decodes more pixels than one request may send). The batch runs as one call of
``run`` in a model slot, and each request gets its own rows back, or its own error (one bad image
fails only the request that sent it).

The queue is bounded: when ``max_queue`` queries are already waiting or running, a new request is
refused at once with :class:`QueueFull` (the server answers 503 with ``Retry-After``) instead of
growing memory and latency. ``max_batch=1`` turns batching off (each request runs alone, as soon as
a slot is free), the queue bound still holds.

A request that goes away while its batch waits is dropped from the batch; one that goes away while
the batch runs leaves its rows unused. Everything here runs on the event loop; only ``run`` runs in
a worker thread (through ``call``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class QueueFull(Exception):
    """The batcher's queue holds ``max_queue`` queries: try again later."""


@dataclass
class _Batch(Generic[P]):
    loop: asyncio.AbstractEventLoop
    payloads: list[P] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    size: int = 0
    pixels: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class BatchStats:
    """What ``/metrics`` reports: batches run, queries in them, and the queue depth now."""

    batches: int
    queries: int
    queued: int
    largest: int


class Batcher(Generic[P, R]):
    """Groups concurrent :meth:`submit` calls into one ``run`` call (see the module docstring).

    ``run(payloads)`` returns one result per payload, in order: a value, or an exception to raise
    in that request alone. ``call(fn, arg)`` runs ``fn(arg)`` in a worker thread within the server's
    model slots and deadline (:meth:`moon.serve.app._Service.call`). ``on_batch(size)``, when
    given, is called with the number of queries of each batch run (the ``/metrics`` histogram).
    """

    def __init__(
        self,
        run: Callable[[list[P]], Sequence[R | BaseException]],
        call: Callable[..., Awaitable[Any]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        max_pixels: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run = run
        self.on_batch = on_batch
        self.call = call
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_pixels = max_pixels
        self._open: _Batch[P] | None = None
        self._queued = 0
        self._running = 0  # batches in a model call now
        self._batches = 0
        self._queries = 0
        self._largest = 0

    def stats(self) -> BatchStats:
        return BatchStats(self._batches, self._queries, self._queued, self._largest)

    def _fits(self, batch: _Batch[P], size: int, pixels: int) -> bool:
        if not batch.payloads:
            return True
        if batch.size + size > self.max_batch:
            return False
        return self.max_pixels is None or batch.pixels + pixels <= self.max_pixels

    async def submit(self, payload: P, *, size: int = 1, pixels: int = 0) -> R:
        """Queue ``payload`` (``size`` queries, ``pixels`` image pixels) and wait for its result.
        Raises :class:`QueueFull` when the queue is full (an empty queue takes any request)."""
        if self._queued and self._queued + size > self.max_queue:
            raise QueueFull(f"{self._queued} queries are queued (the limit is {self.max_queue})")
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is None or batch.loop is not loop or not self._fits(batch, size, pixels):
            if batch is not None and batch.loop is loop:
                batch.full.set()  # it cannot take this request: let it run now
            batch = _Batch(loop)
            self._open = batch
            loop.create_task(self._dispatch(batch))
        future: asyncio.Future = loop.create_future()
        batch.payloads.append(payload)
        batch.futures.append(future)
        batch.size += size
        batch.pixels += pixels
        if batch.size >= self.max_batch:
            batch.full.set()
        self._queued += size
        try:
            return await future
        finally:
            self._queued -= size

    async def _dispatch(self, batch: _Batch[P]) -> None:
        if self._running:  # the model is busy: wait for company (or a full batch) up to max_wait_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(batch.full.wait(), self.max_wait_s)
        else:  # an idle model runs at once: a lone request pays no wait (requests arriving in
            await asyncio.sleep(0)  # the same turn of the event loop still join)
        if self._open is batch:
            self._open = None
        live = [(p, f) for p, f in zip(batch.payloads, batch.futures, strict=True) if not f.done()]
        if not live:
            return
        self._batches += 1
        self._queries += batch.size
        self._largest = max(self._largest, batch.size)
        if self.on_batch is not None:
            self.on_batch(batch.size)
        self._running += 1
        try:
            results = await self.call(self.run, [p for p, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"the batch runner gave {len(results)} results for {len(live)} requests")
        except Exception as exc:  # noqa: BLE001 - handed to every request of the batch, raised there
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._running -= 1
        for (_, future), result in zip(live, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
