"""Core-region detection over a whole store, one image per detector call against batches: images/s.

``moon.regions.run_detection`` with the learned detector at ``--batch-sizes`` (1 = the code before
batching), each on a fresh copy of the same store (no crop cache), run in turn ``--repeats``
rounds; the median per batch size goes to ``benchmarks/results/detect_throughput-<tag>.{json,md}``,
with the largest box difference against batch 1.

    .venv/bin/python benchmarks/detect_throughput.py --detector DIR --products 60 --tag 2026-12-07
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detector", required=True, help="a trained learned-detector directory")
    ap.add_argument("--products", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args(argv)

    import torch

    from moon.regions import load_detector, run_detection
    from moon.world import synthesize

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="moon-detect-bench-"))
    base = synthesize(work / "store", n_products=args.products, seed=args.seed, show_progress=False).root
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    times: dict[int, list[float]] = {b: [] for b in sizes}
    boxes: dict[int, list[dict]] = {}
    images = 0
    for r in range(args.repeats):
        for b in sizes:
            store = work / f"run-{r}-{b}"
            shutil.copytree(base, store)
            det = load_detector("learned", args.detector)
            t = time.perf_counter()
            report = run_detection(store, det, batch_size=b, show_progress=False)
            times[b].append(time.perf_counter() - t)
            images = report.images
            rows = [x for x in pq.read_table(store / "boxes.parquet").to_pylist() if x["source"] == "learned"]
            boxes.setdefault(b, rows)
            print(f"[detect_throughput] round {r + 1} batch {b}: {times[b][-1]:.1f} s", flush=True)
            shutil.rmtree(store)
    ref = {x["image"]: x for x in boxes[sizes[0]]}
    out_rows = []
    for b in sizes:
        med = statistics.median(times[b])
        diff = max((abs(x[k] - ref[x["image"]][k]) for x in boxes[b] for k in ("x0", "y0", "x1", "y1")), default=0.0)
        out_rows.append(
            {
                "batch_size": b,
                "seconds": med,
                "all": times[b],
                "images_per_s": images / med,
                "speedup_vs_first": statistics.median(times[sizes[0]]) / med,
                "max_box_diff_px": diff,
            }
        )
    shutil.rmtree(work, ignore_errors=True)
    meta = {
        "products": args.products,
        "images": images,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_1min_at_end": os.getloadavg()[0],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"detect_throughput-{args.tag}"
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": out_rows}, indent=1) + "\n", encoding="utf-8"
    )
    lines = [
        f"# Learned-detector throughput: {images} images of a {args.products}-product world, {args.threads} threads",
        "",
        f"Median of {args.repeats} runs per batch size, in turn; load average {meta['load_1min_at_end']:.2f} at the end.",
        "",
        "| batch size | seconds | images/s | × batch 1 | max box difference vs batch 1 (px) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in out_rows:
        lines.append(
            f"| {row['batch_size']} | {row['seconds']:.1f} | {row['images_per_s']:.1f} | "
            f"{row['speedup_vs_first']:.2f} | {row['max_box_diff_px']:.3g} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
