"""Dynamic batching: concurrent requests share one model call, each gets its own rows or its own
error, the queue is bounded (503 + Retry-After), and nothing hangs when the runner fails."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from moon.errors import ConfigError
from moon.serve import ServeLimits, create_app
from moon.serve.batching import Batcher, QueueFull


async def _inline(fn, arg):
    return fn(arg)


def _recording_run(calls):
    def run(payloads):
        calls.append(list(payloads))
        return [RuntimeError(f"bad {p}") if str(p).startswith("bad") else f"done {p}" for p in payloads]

    return run


def _gather(batcher, payloads, **kwargs):
    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(p, **kwargs) for p in payloads), return_exceptions=True), 10
        )

    return asyncio.run(main())


def test_concurrent_requests_share_one_model_call():
    calls = []
    batcher = Batcher(_recording_run(calls), _inline, max_batch=16, max_wait_s=0.2, max_queue=64)
    assert _gather(batcher, ["a", "b", "c", "d", "e"]) == [f"done {p}" for p in "abcde"]
    assert calls == [["a", "b", "c", "d", "e"]]
    assert batcher.stats().batches == 1 and batcher.stats().queries == 5 and batcher.stats().queued == 0


def test_max_batch_and_max_pixels_close_a_batch():
    calls = []
    batcher = Batcher(_recording_run(calls), _inline, max_batch=2, max_wait_s=0.2, max_queue=64)
    _gather(batcher, list("abcde"))
    assert [len(c) for c in calls] == [2, 2, 1]
    calls.clear()
    batcher = Batcher(_recording_run(calls), _inline, max_batch=16, max_wait_s=0.2, max_queue=64, max_pixels=100)
    _gather(batcher, list("abc"), pixels=60)  # two together would hold 120 > 100 pixels
    assert calls == [["a"], ["b"], ["c"]]


def test_max_batch_one_runs_each_request_alone():
    calls = []
    # max_wait far beyond _gather's 10 s bound: a full batch that waited for it would fail the test
    batcher = Batcher(_recording_run(calls), _inline, max_batch=1, max_wait_s=60, max_queue=64)
    assert _gather(batcher, list("abc")) == ["done a", "done b", "done c"]
    assert calls == [["a"], ["b"], ["c"]]


def test_one_bad_request_fails_alone():
    calls = []
    batcher = Batcher(_recording_run(calls), _inline, max_batch=16, max_wait_s=0.1, max_queue=64)
    out = _gather(batcher, ["a", "bad", "c"])
    assert out[0] == "done a" and out[2] == "done c"
    assert isinstance(out[1], RuntimeError) and str(out[1]) == "bad bad"
    assert len(calls) == 1


@pytest.mark.parametrize("failure", ["raises", "wrong-length"])
def test_a_failing_runner_reaches_every_request_and_nothing_hangs(failure):
    def run(payloads):
        if failure == "raises":
            raise ValueError("the model broke")
        return ["only one"]

    batcher = Batcher(run, _inline, max_batch=16, max_wait_s=0.05, max_queue=64)
    out = _gather(batcher, ["a", "b"])  # wait_for(10 s) inside: a hang fails the test
    expected = ValueError if failure == "raises" else RuntimeError
    assert all(isinstance(o, expected) for o in out), out


def test_a_full_queue_is_refused_at_once():
    release = threading.Event()

    def run(payloads):
        release.wait(10)
        return list(payloads)

    async def main():
        batcher = Batcher(run, lambda fn, arg: asyncio.to_thread(fn, arg), max_batch=1, max_wait_s=0, max_queue=2)
        first = [asyncio.ensure_future(batcher.submit(p)) for p in "ab"]
        await asyncio.sleep(0.05)
        assert batcher.stats().queued == 2
        with pytest.raises(QueueFull, match="2 queries are queued"):
            await batcher.submit("c")
        assert not any(f.done() for f in first)  # refused at once, not after the queue drained
        release.set()
        return await asyncio.wait_for(asyncio.gather(*first), 10)

    assert asyncio.run(main()) == ["a", "b"]


def _busy_batcher(calls, release, max_wait_s):
    """A batcher whose model is kept busy by the payload "busy" until ``release`` is set."""

    def run(payloads):
        calls.append(list(payloads))
        if "busy" in payloads:
            release.wait(10)
        return [f"done {p}" for p in payloads]

    return Batcher(run, lambda fn, arg: asyncio.to_thread(fn, arg), max_batch=16, max_wait_s=max_wait_s, max_queue=64)


def test_a_lone_request_on_an_idle_model_does_not_wait():
    calls = []
    batcher = _busy_batcher(calls, threading.Event(), max_wait_s=60)
    # a lone request that waited max_wait (60 s) would overrun the 10 s bound
    assert asyncio.run(asyncio.wait_for(batcher.submit("alone"), 10)) == "done alone"
    assert calls == [["alone"]]


def test_a_busy_model_gathers_the_requests_that_arrive_meanwhile():
    calls, release = [], threading.Event()
    batcher = _busy_batcher(calls, release, max_wait_s=0.3)

    async def main():
        busy = asyncio.ensure_future(batcher.submit("busy"))
        while not calls:  # until the model is busy with "busy"
            await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(batcher.submit(p)) for p in ("x", "y")]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.wait_for(asyncio.gather(busy, *later), 10)

    assert asyncio.run(main()) == ["done busy", "done x", "done y"]
    assert calls == [["busy"], ["x", "y"]]


def test_a_request_that_left_is_dropped_from_its_batch():
    calls, release = [], threading.Event()
    batcher = _busy_batcher(calls, release, max_wait_s=0.3)

    async def main():
        busy = asyncio.ensure_future(batcher.submit("busy"))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        release.set()
        return await asyncio.wait_for(asyncio.gather(busy, kept), 10)

    assert asyncio.run(main()) == ["done busy", "done kept"]
    assert calls == [["busy"], ["kept"]] and batcher.stats().queued == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_batch", 0), ("max_batch", 5000), ("max_queue", 0), ("max_wait_ms", -1), ("max_wait_ms", float("nan")),
     ("max_wait_ms", 1e9), ("max_wait_ms", True)],
)  # fmt: skip
def test_bad_batching_limits_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        ServeLimits(**{field: value})


# -- through the HTTP server ----------------------------------------------------------------------


def _post_all(port, bodies, path="/v1/embeddings"):
    """POST every body at once (one thread each); the responses in order."""
    out = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i, body):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            barrier.wait()
            out[i] = client.post(path, json=body)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_http_requests_are_batched_and_equal_the_library(served_index, start_server):
    from moon.data import Query

    index_dir, _, embedder = served_index
    served = type(embedder)()  # the same model (same fingerprint), its calls recorded
    sizes = []
    real = served.encode_queries

    def recording(queries, **kwargs):
        sizes.append(len(queries))
        time.sleep(0.2)  # a model call long enough for the other requests to arrive while it runs
        return real(queries, **kwargs)

    served.encode_queries = recording
    limits = ServeLimits(max_batch=16, max_wait_ms=300)
    server = start_server(create_app(index_dir, served, limits=limits), limits)
    model = httpx.get(f"http://127.0.0.1:{server.port}/v1/models").json()["data"][0]["id"]
    texts = ["red shoe", "blue bag", "green hat", "black boot", "white sock", "red bag", "blue shoe", "green bag"]
    responses = _post_all(server.port, [{"model": model, "input": t} for t in texts])
    assert [r.status_code for r in responses] == [200] * len(texts)
    for text, r in zip(texts, responses, strict=True):
        expected = embedder.encode_queries([Query(id="x", text=text)])[0]
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected, atol=1e-6)
    assert sum(sizes) == len(texts) and max(sizes) > 1, sizes  # fewer model calls than requests
    from prometheus_client.parser import text_string_to_metric_families

    metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples if not s.labels}
    assert samples["moon_batch_size_count"] == len(sizes) and samples["moon_batch_size_sum"] == len(texts)
    assert samples["moon_batch_largest"] == max(sizes) and samples["moon_batch_queue_depth"] == 0


def test_a_full_queue_answers_503_with_retry_after(served_index, start_server):
    index_dir, _, embedder = served_index
    slow = type(embedder)()
    real = slow.encode_queries

    def slow_encode(queries, **kwargs):
        time.sleep(1.0)
        return real(queries, **kwargs)

    slow.encode_queries = slow_encode
    limits = ServeLimits(max_batch=1, max_queue=1, concurrency=1)
    server = start_server(create_app(index_dir, slow, limits=limits), limits)
    responses = _post_all(server.port, [{"text": f"red shoe {i}"} for i in range(4)], path="/embed")
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == 503 and "busy" in refused.json()["error"]["message"]
