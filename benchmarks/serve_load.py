"""Load test of ``moon serve`` on loopback: N concurrent clients, latency p50/p99, error count.

The server runs in its own process (uvicorn, as ``moon serve`` runs it); the clients are threads
with keep-alive ``httpx`` connections. The request mix is 3 text searches (JSON) : 1 photo + text
search (multipart upload). Bounded by ``--requests`` (total) and ``--max-seconds``.

    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 800
    .venv/bin/python benchmarks/serve_load.py --model moon-tiny --clients 4 --requests 200

Without ``--index``, a synthetic store of ``--products`` products (random titles, solid-colour
photos) is written to a temp dir and indexed with ``--model``: ``hash`` (default, a word-hash +
mean-colour embedder defined here, so the numbers measure the server, not a model) or any
``load_embedder`` spec such as ``moon-tiny``. Writes ``benchmarks/results/serve_load-<date>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "red blue green black white leather canvas running shoe boot bag hat scarf watch lamp mug chair sofa phone case".split()
DIM = 64


class HashEmbedder:
    """Word hashing + mean colour → 64-d unit vector (cheap and deterministic)."""

    name = "hash"
    dim = DIM

    def fingerprint(self) -> str:
        return "hash-v1"

    @staticmethod
    def _vector(text: str | None, images) -> np.ndarray:
        from moon.data import load_image

        v = np.zeros(DIM, dtype=np.float32)
        for word in (text or "").lower().split():
            h = hashlib.sha1(word.encode()).digest()
            v[h[0] % (DIM - 4)] += 1.0
        for img in images:
            v[DIM - 4 : DIM - 1] += np.asarray(load_image(img), dtype=np.float32).reshape(-1, 3).mean(0) / 255.0
        v[DIM - 1] = 0.1
        return v / np.linalg.norm(v)

    def encode_products(self, products, *, batch_size=16, show_progress=False):
        return np.stack([self._vector(p.title, p.images) for p in products])

    def encode_queries(self, queries, *, batch_size=16, show_progress=False):
        return np.stack([self._vector(q.text, q.images) for q in queries])


def embedder_for(model: str):
    if model == "hash":
        return HashEmbedder()
    from moon.models import load_embedder

    return load_embedder(model)


def synthetic_store(root: Path, n: int, seed: int):
    from moon.data import Product, write_store

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    products = []
    for i in range(n):
        path = root / "images" / f"p{i}.png"
        Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(path)
        title = " ".join(rng.sample(WORDS, 4))
        products.append(Product(id=f"p{i}", title=title, images=[path], category=["Synthetic"]))
    return write_store(root, products)


def serve(index_dir: str, model: str, port: int, concurrency: int) -> None:
    import uvicorn

    from moon.serve import ServeLimits, create_app
    from moon.serve.server import server_options

    limits = ServeLimits(concurrency=concurrency, timeout_s=60)
    app = create_app(index_dir, embedder_for(model), limits=limits)
    # the protocol `moon serve` runs (read deadline, connection limit, strict framing)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", **server_options(limits))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: mp.Process, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError("the server process died at start-up")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default=None, help="serve this index (its manifest's model) instead of a synthetic one")
    ap.add_argument("--model", default="hash", help="hash (default) or a load_embedder spec, e.g. moon-tiny")
    ap.add_argument("--products", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=800, help="total requests over all clients")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="stop issuing requests after this long")
    ap.add_argument("--concurrency", type=int, default=2, help="server-side model concurrency")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import httpx

    from moon.index import build_index, read_manifest

    tmp = tempfile.TemporaryDirectory(prefix="moon-serve-load-")
    if args.index:
        index_dir = args.index
        model = read_manifest(index_dir).model
        if args.model != "hash":
            model = args.model
    else:
        model = args.model
        store = synthetic_store(Path(tmp.name) / "store", args.products, args.seed)
        index_dir = str(Path(tmp.name) / "index")
        build_index(embedder_for(model), store, index_dir, model=model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("fork").Process(target=serve, args=(index_dir, model, port, args.concurrency), daemon=True)
    proc.start()
    try:
        wait_ready(url, proc)
        photo = io.BytesIO()
        Image.new("RGB", (256, 256), (200, 30, 30)).save(photo, format="JPEG", quality=90)
        photo_bytes = photo.getvalue()

        latencies: dict[str, list[float]] = {"text": [], "photo": []}
        statuses: Counter[str] = Counter()
        lock = threading.Lock()
        next_request = iter(range(args.requests))
        stop_at = time.monotonic() + args.max_seconds

        def client(cid: int) -> None:
            rng = random.Random(args.seed * 1000 + cid)
            with httpx.Client(base_url=url, timeout=120) as http:
                while time.monotonic() < stop_at:
                    with lock:
                        i = next(next_request, None)
                    if i is None:
                        return
                    text = " ".join(rng.sample(WORDS, 2))
                    kind = "photo" if i % 4 == 3 else "text"
                    start = time.perf_counter()
                    try:
                        if kind == "text":
                            r = http.post("/search", json={"text": text, "k": args.k})
                        else:
                            r = http.post(
                                "/search",
                                data={"text": text, "k": str(args.k)},
                                files={"image": ("q.jpg", photo_bytes, "image/jpeg")},
                            )
                        ok = r.status_code == 200 and len(r.json()["results"]) == min(args.k, args.products)
                        status = str(r.status_code) if ok or r.status_code != 200 else "200-bad-body"
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    elapsed = time.perf_counter() - start
                    with lock:
                        statuses[status] += 1
                        if status == "200":
                            latencies[kind].append(elapsed)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server_metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.join(10)
        tmp.cleanup()

    done = sum(statuses.values())
    errors = done - statuses.get("200", 0)
    every = latencies["text"] + latencies["photo"]

    def summary(values: list[float]) -> dict:
        return {
            "n": len(values),
            "p50_ms": round(1000 * percentile(values, 50), 2),
            "p90_ms": round(1000 * percentile(values, 90), 2),
            "p99_ms": round(1000 * percentile(values, 99), 2),
            "max_ms": round(1000 * max(values), 2) if values else None,
        }

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    result = {
        "benchmark": "serve_load",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "index": args.index or f"synthetic store of {args.products:,} products, exact index",
        "clients": args.clients,
        "server_concurrency": args.concurrency,
        "requests": done,
        "mix": "3 text (JSON) : 1 photo 256x256 JPEG + text (multipart)",
        "k": args.k,
        "wall_s": round(wall, 2),
        "throughput_rps": round(done / wall, 2) if wall else None,
        "errors": errors,
        "statuses": dict(statuses),
        "latency": {"all": summary(every), "text": summary(latencies["text"]), "photo": summary(latencies["photo"])},
        "server_requests_counted": sum(
            int(line.rsplit(" ", 1)[1])
            for line in server_metrics.splitlines()
            if line.startswith('moon_requests_total{route="/search"')
        ),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "note": "client and server share the machine (loopback)"},
    }
    suffix = "" if model == "hash" else "-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in model)
    out = Path(
        args.out or Path(__file__).parent / "results" / f"serve_load-{datetime.now(timezone.utc):%Y-%m-%d}{suffix}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency"]["all"]
    print(
        f"{done} requests, {args.clients} clients, {result['throughput_rps']} req/s, p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, errors {errors}"
    )
    print(f"wrote {out}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
