"""Dynamic batching on and off, side by side: ``moon serve`` with a real model under 1–64 clients.

For each batching setting (``--batching on,off``: ``--max-batch`` queries per model call, or 1) one
server process serves the same index (a synthetic store of ``--products`` products, indexed once with
``--model``), and for each request kind (``text``: a JSON text search; ``image``: a 256×256 JPEG
upload) and each client count, ``--per-client`` requests per client (at least 32) are sent by that
many keep-alive clients at once. Reported per cell: throughput, p50/p99 latency, errors by status
(503 = the queue was full), and the server's peak RSS per setting. Client and server share the
machine (loopback), so the numbers are an end-to-end bound, not the model's alone.

    .venv/bin/python benchmarks/serve_batching.py --model moon-smol --tag 2026-12-08
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import WORDS, embedder_for, free_port, percentile, synthetic_store, wait_ready  # noqa: E402


def serve(index_dir: str, model: str, port: int, max_batch: int, max_wait_ms: float, concurrency: int) -> None:
    import uvicorn

    from moon.serve import ServeLimits, create_app
    from moon.serve.server import server_options

    limits = ServeLimits(
        concurrency=concurrency, timeout_s=120, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=1024
    )
    app = create_app(index_dir, embedder_for(model), limits=limits)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", **server_options(limits))


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def load(url: str, kind: str, clients: int, requests: int, photo: bytes, seed: int, max_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    remaining = iter(range(requests))
    stop_at = time.monotonic() + max_seconds
    barrier = threading.Barrier(clients)

    def client(cid: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        with httpx.Client(base_url=url, timeout=300) as http:
            barrier.wait()
            while time.monotonic() < stop_at:
                with lock:
                    i = next(remaining, None)
                if i is None:
                    return
                text = " ".join(rng.sample(WORDS, 2))
                start = time.perf_counter()
                try:
                    if kind == "text":
                        r = http.post("/search", json={"text": text, "k": 10})
                    else:
                        r = http.post("/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": "10"})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = statuses.get("200", 0)
    return {
        "kind": kind,
        "clients": clients,
        "requests": sum(statuses.values()),
        "ok": ok,
        "statuses": dict(statuses),
        "wall_s": round(wall, 2),
        "throughput_rps": round(ok / wall, 2) if wall else None,
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="moon-smol", help="a load_embedder spec (or hash)")
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--kinds", default="text,image")
    ap.add_argument("--batching", default="off,on,on,off", help="servers in this order (repeats: ABBA against drift)")
    ap.add_argument("--max-batch", type=int, default=16, help="queries per model call when batching is on")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=2, help="server-side model slots")
    ap.add_argument("--per-client", type=int, default=4, help="requests per client (at least 32 per cell)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    args = ap.parse_args()

    from moon.index import build_index

    clients = [int(c) for c in args.clients.split(",")]
    kinds = args.kinds.split(",")
    photo_buf = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(photo_buf, format="JPEG", quality=90)
    photo = photo_buf.getvalue()
    tmp = tempfile.TemporaryDirectory(prefix="moon-serve-batching-")
    store = synthetic_store(Path(tmp.name) / "store", args.products, args.seed)
    index_dir = str(Path(tmp.name) / "index")
    t0 = time.perf_counter()
    build_index(embedder_for(args.model), store, index_dir, model=args.model)
    print(f"index of {args.products} products built in {time.perf_counter() - t0:.0f} s", flush=True)
    rows, rss = [], {}
    for n, setting in enumerate(args.batching.split(",")):
        max_batch = args.max_batch if setting == "on" else 1
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = mp.get_context("spawn").Process(  # fork after torch ran threads can crash the child
            target=serve,
            args=(index_dir, args.model, port, max_batch, args.max_wait_ms, args.concurrency),
            daemon=True,
        )
        proc.start()
        try:
            wait_ready(url, proc)
            load(url, "text", 2, 8, photo, args.seed, 60)  # warm-up: allocator, kernels
            load(url, "image", 2, 8, photo, args.seed, 60)
            for kind in kinds:
                for c in clients:
                    row = load(url, kind, c, max(32, c * args.per_client), photo, args.seed, args.max_seconds)
                    row["batching"] = setting
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            rss[f"{n}:{setting}"] = peak_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.join(10)
    tmp.cleanup()
    result = {
        "benchmark": "serve_batching",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "products": args.products,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "concurrency": args.concurrency,
        "peak_rss_mb": rss,
        "rows": rows,
    }
    out = HERE / "results" / f"serve_batching-{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Dynamic batching on / off: `moon serve` with {args.model} ({result['date']})",
        "",
        f"{args.products}-product exact index; /search with a text (JSON) or a 256×256 JPEG upload; batching on ="
        f" up to {args.max_batch} queries per model call, {args.max_wait_ms:g} ms wait; {args.concurrency} model"
        f" slots; peak server RSS {rss}. Client and server on the same machine (loopback).",
        "",
        "| kind | clients | batching | requests | req/s, median (each server) | p50 ms | p99 ms | not 200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["kind"], r["clients"], r["batching"]), []).append(r)
    for (kind, c, setting), rs in sorted(cells.items()):
        bad: Counter[str] = Counter()
        for r in rs:
            bad.update({k: v for k, v in r["statuses"].items() if k != "200"})
        rps = [r["throughput_rps"] for r in rs]
        shown = f"{statistics.median(rps):.1f}" + (f" ({', '.join(f'{x:.1f}' for x in rps)})" if len(rps) > 1 else "")
        lines.append(
            f"| {kind} | {c} | {setting} | {sum(r['requests'] for r in rs)} | {shown} | "
            f"{statistics.median(r['p50_ms'] for r in rs):.0f} | {statistics.median(r['p99_ms'] for r in rs):.0f} | "
            f"{dict(bad) or 0} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
