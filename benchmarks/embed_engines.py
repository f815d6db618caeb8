"""Products per second of `moon embed`'s engines on this machine: local vs ray (an actor pool).

    .venv/bin/python benchmarks/embed_engines.py [--model moon-tiny] [--n 400] [--shard-size 50] [--actors 2]

Builds a synthetic store of ``--n`` products (one 64×64 photo each) in a temporary folder, embeds it
with the local engine (torch threads = the machine's CPUs) and with the Ray engine (a local cluster on
all CPUs, ``--actors`` actors sharing them), and checks that both wrote the same ids in the same
order. The Ray time is given with and without the cluster start; the model load of each actor is in
both. Results go to ``benchmarks/results/embed_engines-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from moon.data import Product, Query, write_store
from moon.embed import VectorShards, embed_store
from moon.embed.ray_engine import RaySettings
from moon.models import load_embedder


def build_store(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    words = "red blue steel cotton running shoe mug lamp cable phone case toy car bag leather".split()
    products = []
    for i in range(n):
        image = root / "images" / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        title = " ".join(rng.choice(words, size=int(rng.integers(3, 20))))
        products.append(Product(id=f"p{i}", title=title, images=[image], category=["Cat", f"Sub{i % 5}"]))
    write_store(root, products, [Query(id="q0", text="red shoe")], [])
    return root


def read_vectors(out: Path) -> tuple[list[str], np.ndarray]:
    ids, parts = [], []
    for shard_ids, vectors in VectorShards.open(out):
        ids.extend(shard_ids)
        parts.append(vectors)
    return ids, np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moon-tiny")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    embedder = load_embedder(args.model)
    common = {"model": args.model, "shard_size": args.shard_size, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "store", args.n)
        t0 = time.perf_counter()
        local = embed_store(store, Path(tmp) / "local", embedder, **common)
        local_wall = time.perf_counter() - t0

        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        try:
            settings = RaySettings(actors=args.actors)
            t0 = time.perf_counter()
            embed_store(store, Path(tmp) / "ray", embedder, engine="ray", ray=settings, **common)
            ray_wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        local_ids, local_vectors = read_vectors(Path(tmp) / "local")
        ray_ids, ray_vectors = read_vectors(Path(tmp) / "ray")
    assert local_ids == ray_ids, "the engines wrote other ids"
    result = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": cpus, "platform": platform.platform(), "torch": torch.__version__, "ray": ray.__version__},
        "settings": vars(args),
        "local": {"seconds": round(local_wall, 3), "products_per_s": round(args.n / local_wall, 2)},
        "ray": {
            "actors": args.actors,
            "cluster_start_s": round(ray_start, 3),
            "seconds": round(ray_wall, 3),
            "products_per_s": round(args.n / ray_wall, 2),
            "products_per_s_with_cluster_start": round(args.n / (ray_wall + ray_start), 2),
        },
        "max_abs_diff_vs_local": float(np.abs(local_vectors - ray_vectors).max()),
        "note": "local: one process, torch threads = all CPUs; ray: actors share the CPUs (threads = CPUs // actors), "
        "each loads its own model (included in seconds); other jobs may share the machine, so timings are noisy; "
        "other thread counts may change the last float bits (max_abs_diff_vs_local says by how much)",
    }
    out = Path(__file__).parent / "results" / f"embed_engines-{result['date']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"local {local.products_per_second:.1f} products/s (encode only); written {out}")


if __name__ == "__main__":
    main()
