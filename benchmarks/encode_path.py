"""The encode path before and after, side by side: ``moon-smol`` ``encode_products`` on 200 products.

Slice 2 of the fast-path issue. Each measurement is a fresh process (``--worker``) that loads the
embedder and times ``encode_products`` three ways:

* **cold**: no image feature cached anywhere (every image decoded, preprocessed, encoded);
* **warm**: the process-wide feature cache filled (what re-encoding in one process pays);
* **disk** (with ``--disk``): a new process whose in-memory cache is empty but whose
  ``MOON_FEATURE_CACHE`` directory holds every image's features (what a second run pays).

Variants run in turn, A B C A B C …, ``--repeats`` rounds, and the table gives each one's median:
``old`` is the library at ``--old-src`` (a checkout's ``src/`` of the code before the slice), the
others are this tree with ``graft.image_precision`` fp32 or bf16. The world and its truth-box crops
are those of ``benchmarks/profile_encode_train.py`` (same ``--out``). Vectors are compared with the
first variant's: the largest absolute difference of any coordinate.

    .venv/bin/python benchmarks/encode_path.py --old-src /tmp/old/src --tag 2026-12-07
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from profile_encode_train import open_world, truth_crops, with_crops

    from moon.model import MoonEmbedder
    from moon.model.graft import FEATURE_CACHE

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    store = open_world(out, args.products, args.seed)
    crops = truth_crops(store, out / f"crops-{args.products}-s{args.seed}")
    products = [with_crops(p, crops) for p in store.products()[: args.products]]
    kwargs: dict[str, Any] = {"device": "cpu", "precision": args.precision}
    if args.image_precision != "fp32":
        kwargs["graft"] = {"image_precision": args.image_precision}
    emb = MoonEmbedder.from_pretrained(args.preset, **kwargs)
    emb.encode_products(products[: args.batch], batch_size=args.batch)  # warm-up: allocator, oneDNN kernels
    import moon

    result: dict[str, Any] = {"moon": moon.__file__}
    if args.disk_only:
        FEATURE_CACHE.entries.clear()
        t = time.perf_counter()
        vecs = emb.encode_products(products, batch_size=args.batch)
        result["disk_s"] = time.perf_counter() - t
    else:
        FEATURE_CACHE.entries.clear()
        t = time.perf_counter()
        vecs = emb.encode_products(products, batch_size=args.batch)
        result["cold_s"] = time.perf_counter() - t
        t = time.perf_counter()
        emb.encode_products(products, batch_size=args.batch)
        result["warm_s"] = time.perf_counter() - t
    np.save(args.vectors, vecs)
    print(json.dumps(result))


def run_worker(args: argparse.Namespace, variant: dict[str, Any], vectors: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--out",
        args.out,
        "--products",
        str(args.products),
        "--seed",
        str(args.seed),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--precision",
        args.precision,
        "--preset",
        args.preset,
        "--image-precision",
        variant["image_precision"],
        "--vectors",
        str(vectors),
    ]
    if variant.get("disk_only"):
        cmd.append("--disk-only")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--disk-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vectors", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--old-src", default=None, help="src/ of a checkout of the code before (omit: no old row)")
    ap.add_argument("--preset", default="moon-smol")
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="the model's [auto]")
    ap.add_argument("--image-precision", default="fp32", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="profile-out", help="world + crops cache (shared with profile_encode_train)")
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    base_env = {k: v for k, v in os.environ.items() if k not in ("MOON_FEATURE_CACHE", "PYTHONPATH")}
    here_src = str(HERE.parent / "src")
    disk = Path(tempfile.mkdtemp(prefix="moon-feature-cache-"))
    variants: list[dict[str, Any]] = []
    if args.old_src:
        variants.append({"name": "old", "src": args.old_src, "image_precision": "fp32"})
    variants += [
        {"name": "new, image fp32", "src": here_src, "image_precision": "fp32"},
        {"name": "new, image bf16", "src": here_src, "image_precision": "bf16"},
        {
            "name": "new, image fp32, features on disk",
            "src": here_src,
            "image_precision": "fp32",
            "disk_only": True,
            "cache": str(disk),
        },
    ]
    # fill the disk store once (not timed) for the disk rows
    fill_env = {**base_env, "PYTHONPATH": here_src, "MOON_FEATURE_CACHE": str(disk)}
    run_worker(args, {"name": "fill", "image_precision": "fp32"}, disk / "fill.npy", fill_env)
    times: dict[str, dict[str, list[float]]] = {v["name"]: {} for v in variants}
    vec_dir = Path(tempfile.mkdtemp(prefix="moon-encode-vectors-"))
    for r in range(args.repeats):
        for v in variants:
            env = {**base_env, "PYTHONPATH": v["src"]}
            if v.get("cache"):
                env["MOON_FEATURE_CACHE"] = v["cache"]
            res = run_worker(args, v, vec_dir / f"{variants.index(v)}.npy", env)
            times[v["name"]].setdefault("moon", []).append(res.pop("moon"))
            for k, val in res.items():
                times[v["name"]].setdefault(k, []).append(val)
            print(f"[encode_path] round {r + 1} {v['name']}: {res}", flush=True)
    ref = np.load(vec_dir / "0.npy")
    rows = []
    for i, v in enumerate(variants):
        vec = np.load(vec_dir / f"{i}.npy")
        t = times[v["name"]]
        row = {
            "variant": v["name"],
            "image_precision": v["image_precision"],
            "moon": sorted(set(t.pop("moon"))),
            "max_abs_diff_vs_first": float(np.abs(vec - ref).max()),
        }
        for k, vals in t.items():
            row[k] = statistics.median(vals)
            row[k + "_all"] = vals
            row[k.replace("_s", "_products_per_s")] = args.products / statistics.median(vals)
        rows.append(row)
    first = rows[0]
    for row in rows:
        if "cold_s" in row and "cold_s" in first:
            row["cold_speedup_vs_first"] = first["cold_s"] / row["cold_s"]
            row["warm_speedup_vs_first"] = first["warm_s"] / row["warm_s"]
        if "disk_s" in row and "cold_s" in first:
            row["disk_speedup_vs_first_cold"] = first["cold_s"] / row["disk_s"]
    write(args, rows)
    return 0


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import platform

    import torch

    from moon.precision import native_bf16

    load = os.getloadavg()[0]
    meta = {
        "preset": args.preset,
        "products": args.products,
        "seed": args.seed,
        "batch": args.batch,
        "threads": args.threads,
        "precision": args.precision,
        "repeats": args.repeats,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "native_bf16": native_bf16(),
            "torch": torch.__version__,
            "load_1min_at_end": load,
        },
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"encode_path-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    lines = [
        f"# Encode path, {args.preset}: {args.products} products, batch {args.batch}, {args.threads} threads, "
        f"model precision {args.precision}",
        "",
        f"Median of {args.repeats} fresh processes per variant, run in turn; load average {load:.2f} at the end. "
        "cold: no feature cached; warm: in-memory cache full; disk: new process, features on disk.",
        "",
        "| variant | cold s | warm s | disk s | cold × | warm × | products/s cold | max |Δ| vs first |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def f(k: str, fmt: str = "{:.2f}", r: dict[str, Any] = r) -> str:
            return fmt.format(r[k]) if k in r else ""

        speed = f("cold_speedup_vs_first") or (
            f("disk_speedup_vs_first_cold") + " (disk vs cold)" if "disk_s" in r else ""
        )
        lines.append(
            f"| {r['variant']} | {f('cold_s')} | {f('warm_s')} | {f('disk_s')} | {speed} | {f('warm_speedup_vs_first')} "
            f"| {f('cold_products_per_s', '{:.1f}')} | {r['max_abs_diff_vs_first']:.2e} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
