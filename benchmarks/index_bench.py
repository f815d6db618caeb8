"""Queries per second and Recall@10 of the approximate indexes (HNSW, IVF-PQ) vs exact search.

One run, side by side, on N random unit vectors of dimension D (default 2048, the hidden size of
Qwen2.5-VL-3B) with Q fresh random unit queries. The exact index (FlatIP) gives the ground truth.
1,000,000 × 2048 float32 is 8 GB per copy; use ``--n`` to fit the machine (the run says what it used).

    .venv/bin/python benchmarks/index_bench.py --n 200000 --queries 1000

Writes ``benchmarks/results/index_bench-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from moon.index.kinds import default_params, new_faiss_index
from moon.index.recall import recall_at_k


def unit_rows(rng: np.random.Generator, n: int, dim: int, chunk: int = 50_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float]:
    """Labels ``(q, k)`` and queries per second, searching ``batch`` queries per call."""
    labels = np.empty((len(queries), k), dtype=np.int64)
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        labels[i : i + batch] = index.search(queries[i : i + batch], k)[1]
    return labels, len(queries) / (time.perf_counter() - start)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_gib, 1),
        "faiss": faiss.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="indexed vectors (1,000,000 needs ~8 GB per copy)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="queries per search call (1 = one request at a time)")
    ap.add_argument(
        "--threads", type=int, default=1, help="FAISS OpenMP threads (1 on a shared machine: spinning threads starve)"
    )
    ap.add_argument("--hnsw-ef", default="64,128,256", help="efSearch values to try")
    ap.add_argument("--ivf-nprobe", default="8,32,128", help="nprobe values to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="why this n, what else ran on the machine")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    base = unit_rows(rng, args.n, args.dim)
    queries = unit_rows(rng, args.queries, args.dim)
    labels = np.arange(args.n, dtype=np.int64)
    print(
        f"data: {args.n:,} × {args.dim} unit vectors ({base.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )

    rows = []

    def build(kind: str) -> tuple[faiss.Index, dict, float]:
        params = default_params(kind, args.dim, args.n)
        index = new_faiss_index(kind, args.dim, params)
        start = time.perf_counter()
        if not index.is_trained:
            sample = base[np.sort(rng.choice(args.n, size=min(args.n, params["train_size"]), replace=False))]
            index.train(sample)
        for i in range(0, args.n, 50_000):
            index.add_with_ids(base[i : i + 50_000], labels[i : i + 50_000])
        return index, params, time.perf_counter() - start

    exact, _, exact_build = build("exact")
    truth, exact_qps = timed_search(exact, queries, args.k, args.batch)
    rows.append(
        {
            "kind": "exact",
            "params": {},
            "build_s": round(exact_build, 2),
            "qps": round(exact_qps, 1),
            "recall_at_10": 1.0,
            "approx_bytes": args.n * args.dim * 4,
        }
    )
    print(f"exact  build {exact_build:7.1f} s  {exact_qps:9.1f} q/s  recall@10 1.0000")
    del exact

    hnsw, hnsw_params, hnsw_build = build("hnsw")
    inner = faiss.downcast_index(hnsw.index)
    for ef in [int(x) for x in args.hnsw_ef.split(",")]:
        inner.hnsw.efSearch = ef
        found, qps = timed_search(hnsw, queries, args.k, args.batch)
        recall = recall_at_k(found, truth, args.k)
        rows.append(
            {
                "kind": "hnsw",
                "params": {**hnsw_params, "ef_search": ef},
                "build_s": round(hnsw_build, 2),
                "qps": round(qps, 1),
                "recall_at_10": round(recall, 4),
                "approx_bytes": args.n * (args.dim * 4 + hnsw_params["M"] * 2 * 4 + 8),
            }
        )
        print(
            f"hnsw   build {hnsw_build:7.1f} s  {qps:9.1f} q/s  recall@10 {recall:.4f}  (M={hnsw_params['M']}, efSearch={ef})"
        )
    del hnsw, inner

    ivf, ivf_params, ivf_build = build("ivfpq")
    for nprobe in [int(x) for x in args.ivf_nprobe.split(",")]:
        ivf.nprobe = min(nprobe, ivf_params["nlist"])
        found, qps = timed_search(ivf, queries, args.k, args.batch)
        recall = recall_at_k(found, truth, args.k)
        rows.append(
            {
                "kind": "ivfpq",
                "params": {**ivf_params, "nprobe": ivf.nprobe},
                "build_s": round(ivf_build, 2),
                "qps": round(qps, 1),
                "recall_at_10": round(recall, 4),
                "approx_bytes": args.n * (ivf_params["pq_m"] + 8),
            }
        )
        print(
            f"ivfpq  build {ivf_build:7.1f} s  {qps:9.1f} q/s  recall@10 {recall:.4f}  (nlist={ivf_params['nlist']}, m={ivf_params['pq_m']}, nprobe={ivf.nprobe})"
        )

    result = {
        "benchmark": "index_bench",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": f"{args.n:,} random unit vectors (Gaussian, normalised), dim {args.dim}; {args.queries:,} fresh random unit queries",
        "note": "Random high-dimensional data has no neighbourhood structure: the hardest case for approximate search.",
        "context": args.note,
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "batch": args.batch,
        "threads": args.threads,
        "machine": machine(),
        "results": rows,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(
        args.out or Path(__file__).parent / "results" / f"index_bench-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
