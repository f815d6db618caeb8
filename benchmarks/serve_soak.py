"""Soak test of ``moon serve`` with a real model: is memory flat under minutes of steady load?

One server process (dynamic batching on, the defaults of ``ServeLimits``) serves a synthetic store of
``--products`` products indexed with ``--model``; ``--clients`` keep-alive clients send a steady mix
(3 text searches : 1 photo upload, 256×256 JPEG) for ``--seconds``. Every ``--sample-s`` seconds the
server's resident memory (``VmRSS`` from ``/proc``) and the requests answered so far are recorded.

Reported: the RSS series, its growth from the end of the first minute (warm-up: allocator pools,
kernel caches) to the end, the least-squares slope over the same window in MiB per minute, requests
per second per minute, and every status (503 = queue full, never expected at this load). Client and
server share the machine (loopback).

    .venv/bin/python benchmarks/serve_soak.py --model moon-smol --seconds 300 --tag 2026-12-08
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_batching import serve  # noqa: E402
from serve_load import WORDS, embedder_for, free_port, synthetic_store, wait_ready  # noqa: E402


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def soak(url: str, pid: int, clients: int, seconds: float, sample_s: float, photo: bytes, seed: int) -> dict:
    import httpx

    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    answered = [0]
    stop_at = time.monotonic() + seconds

    def client(cid: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        with httpx.Client(base_url=url, timeout=300) as http:
            n = 0
            while time.monotonic() < stop_at:
                text = " ".join(rng.sample(WORDS, 2))
                try:
                    if n % 4 == 3:
                        r = http.post("/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": "10"})
                    else:
                        r = http.post("/search", json={"text": text, "k": 10})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                n += 1
                with lock:
                    statuses[status] += 1
                    answered[0] += status == "200"

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    while time.monotonic() < stop_at:
        time.sleep(min(sample_s, max(0.0, stop_at - time.monotonic())))
        with lock:
            done = answered[0]
        samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mib": rss_mib(pid), "answered": done})
    for t in threads:
        t.join()
    return {"statuses": dict(statuses), "samples": samples}


def summarise(samples: list[dict], warmup_s: float) -> dict:
    """RSS growth and least-squares slope after ``warmup_s``; throughput per minute."""
    after = [s for s in samples if s["t_s"] >= warmup_s and s["rss_mib"] is not None]
    out: dict = {"warmup_s": warmup_s}
    if len(after) >= 2:
        t = np.array([s["t_s"] for s in after]) / 60.0
        r = np.array([s["rss_mib"] for s in after])
        slope = float(np.polyfit(t, r, 1)[0])
        out.update(
            rss_start_mib=round(float(r[0]), 1),
            rss_end_mib=round(float(r[-1]), 1),
            rss_max_mib=round(float(r.max()), 1),
            growth_mib=round(float(r[-1] - r[0]), 1),
            slope_mib_per_min=round(slope, 2),
        )
    per_minute = []
    prev_t, prev_n = 0.0, 0
    for s in samples:
        if s["t_s"] - prev_t >= 60 or s is samples[-1]:
            span = s["t_s"] - prev_t
            per_minute.append({"until_s": s["t_s"], "rps": round((s["answered"] - prev_n) / span, 2) if span else None})
            prev_t, prev_n = s["t_s"], s["answered"]
    out["rps_per_minute"] = per_minute
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="moon-smol", help="a load_embedder spec (or hash)")
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    from moon.index import build_index

    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "store", args.products, args.seed)
        index_dir = Path(tmp) / "index"
        build_index(embedder_for(args.model), store, index_dir, model=args.model)
        buf = io.BytesIO()
        Image.new("RGB", (256, 256), (200, 40, 40)).save(buf, format="JPEG")
        port = free_port()
        from moon.serve import ServeLimits

        d = ServeLimits()
        proc = mp.get_context("spawn").Process(
            target=serve, args=(str(index_dir), args.model, port, d.max_batch, d.max_wait_ms, d.concurrency)
        )
        proc.start()
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, timeout=300)
            run = soak(url, proc.pid, args.clients, args.seconds, args.sample_s, buf.getvalue(), args.seed)
        finally:
            proc.terminate()
            proc.join(30)
    result = {
        "benchmark": "serve_soak",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "products": args.products,
        "clients": args.clients,
        "seconds": args.seconds,
        "load_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "limits": {"max_batch": d.max_batch, "max_wait_ms": d.max_wait_ms, "concurrency": d.concurrency},
        **run,
        "summary": summarise(run["samples"], args.warmup_s),
    }
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"serve_soak-{args.tag}"
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    lines = [
        f"# Soak: `moon serve` with {args.model}, {args.clients} clients, {args.seconds:.0f} s ({result['date']})",
        "",
        f"{args.products} products; 3 text searches : 1 photo upload; dynamic batching at the defaults "
        f"(max batch {d.max_batch}, max wait {d.max_wait_ms} ms, {d.concurrency} model slots); server RSS every "
        f"{args.sample_s:.0f} s. 1-min load average {result['load_1min']['start']} at start, "
        f"{result['load_1min']['end']} at end"
        + (
            " (other jobs ran: the throughput is not the server's best)." if result["load_1min"]["start"] > 1.5 else "."
        ),
        "",
        f"- statuses: {', '.join(f'{k}: {v}' for k, v in sorted(run['statuses'].items()))}",
        f"- server RSS after the {args.warmup_s:.0f} s warm-up: {s.get('rss_start_mib')} → {s.get('rss_end_mib')} MiB "
        f"(growth {s.get('growth_mib')} MiB, max {s.get('rss_max_mib')} MiB; least-squares slope "
        f"{s.get('slope_mib_per_min')} MiB/min)",
        "- answered per second, minute by minute: " + ", ".join(str(m["rps"]) for m in s["rps_per_minute"]),
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
