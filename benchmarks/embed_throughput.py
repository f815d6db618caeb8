"""Products per second of MOON presets on this machine: batched path vs a naive one-at-a-time loop.

    .venv/bin/python benchmarks/embed_throughput.py [--presets moon-tiny moon-small] [--n 48]

Both paths encode the same synthetic products (1-3 images of 90-240 px, a crop on some, titles of
varied length, category and attributes) with the same model, in one run; the vectors of the two
paths are checked to agree. Results go to ``benchmarks/results/embed_throughput-<host>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moon.data import Product
from moon.model import MoonEmbedder


def synthetic_products(n: int, seed: int = 0) -> list[Product]:
    rng = np.random.default_rng(seed)
    words = "red blue steel cotton running shoe mug lamp cable phone case toy car bag leather".split()
    out = []
    for i in range(n):
        images = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(x) for x in rng.integers(90, 241, size=2))
            images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        title = " ".join(rng.choice(words, size=int(rng.integers(3, 30))))
        out.append(
            Product(
                f"p{i}",
                title,
                images,
                ["Cat", f"Sub{i % 5}"],
                {"color": [str(rng.choice(words))]},
                crops=images[:1] if i % 2 else [],
            )
        )
    return out


def measure(preset: str, products: list[Product], batch_size: int, repeats: int) -> dict:
    emb = MoonEmbedder.from_pretrained(preset, device="cpu")
    emb.encode_products(products[:4], batch_size=4)  # warm-up
    n_params = sum(p.numel() for p in emb.parameters())
    best_batched, best_naive = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        batched = emb.encode_products(products, batch_size=batch_size)
        best_batched = min(best_batched, time.perf_counter() - t0)
        t0 = time.perf_counter()
        naive = np.concatenate([emb.encode_products([p], batch_size=1) for p in products])
        best_naive = min(best_naive, time.perf_counter() - t0)
    return {
        "preset": preset,
        "params": n_params,
        "dim": emb.dim,
        "moe_mode": emb.config.moe_mode,
        "max_pixels": emb.config.max_pixels,
        "batch_size": batch_size,
        "products": len(products),
        "batched_products_per_s": round(len(products) / best_batched, 2),
        "naive_products_per_s": round(len(products) / best_naive, 2),
        "speedup": round(best_naive / best_batched, 2),
        "max_abs_diff_batched_vs_naive": float(np.abs(batched - naive).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["moon-tiny", "moon-small"])
    parser.add_argument("--n", type=int, default=48, help="products per timing run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    products = synthetic_products(args.n)
    load_before = os.getloadavg()
    rows = [measure(p, products, args.batch_size, args.repeats) for p in args.presets]
    result = {
        "benchmark": "embed_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "host": socket.gethostname(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
        },
        "results": rows,
    }
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / (f"embed_throughput-{socket.gethostname()}-{dt.date.today().isoformat()}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for r in rows:
        print(
            f"{r['preset']:>11}: batched {r['batched_products_per_s']:7.2f} products/s, naive "
            f"{r['naive_products_per_s']:7.2f} products/s ({r['speedup']}x), max |diff| "
            f"{r['max_abs_diff_batched_vs_naive']:.1e}"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
