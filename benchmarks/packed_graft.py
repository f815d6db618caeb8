"""Packed sequences against the padded path, side by side in one process: ``moon-smol`` on this CPU.

Slice 3 of the fast-path issue. One embedder, its ``config.packed`` switched between rounds
(A B A B …, ``--repeats`` rounds each, medians):

* **encode (warm)**: ``encode_products`` of ``--products`` products, batch ``--batch``, with every
  image's features already in the process cache (packing changes the LM, not the image encoder);
* **train step**: forward and backward of one training batch (``--train-batch`` queries and their
  purchased products, in-batch InfoNCE through ``moon.train.chunked.forward_backward``, as the
  trainer runs it; no optimizer step).

Also reported: the share of padding in the padded batches (what packing removes), and the largest
difference of any vector coordinate between the two paths. The world and its truth-box crops are
those of ``benchmarks/profile_encode_train.py`` (same ``--out``).

    .venv/bin/python benchmarks/packed_graft.py --tag 2026-12-08
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def padding_share(emb, items: list, batch: int) -> float:
    """1 − real tokens / (B × L) over the length-sorted batches ``encode_products`` forms."""
    lengths = sorted(len(x) for x in items)
    real = padded = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        real += sum(chunk)
        padded += len(chunk) * max(chunk)
    return 1.0 - real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="moon-smol")
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="profile-out")
    ap.add_argument("--tag", default=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from profile_encode_train import open_world, pick_train_batch, truth_crops, with_crops

    from moon.model import MoonEmbedder
    from moon.train.chunked import forward_backward
    from moon.train.losses import ContrastiveLoss

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    store = open_world(out, args.products, args.seed)
    crops = truth_crops(store, out / f"crops-{args.products}-s{args.seed}")
    products = [with_crops(p, crops) for p in store.products()[: args.products]]
    queries, bought = pick_train_batch(store, crops, args.train_batch, args.seed)
    emb = MoonEmbedder.from_pretrained(args.preset, device="cpu", precision=args.precision)
    if not emb.packing:
        raise SystemExit(f"{args.preset}: its decoder is not packed (emb.packing is False)")
    emb.encode_products(products, batch_size=args.batch)  # fills the feature cache; allocator, kernels
    items = emb.build_product_inputs(products)
    loss = ContrastiveLoss(0.05)
    n = len(queries)
    allowed, positive = torch.ones(n, n, dtype=torch.bool), torch.arange(n)

    def loss_fn(q, p):
        total = loss(q, p, allowed, positive).sum()
        return total / n, {}

    def autocast():
        import contextlib

        return torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def set_packed(on: bool) -> None:
        emb.config = emb.config.replace(packed=on)
        assert emb.packing is on

    def encode(on: bool) -> tuple[float, np.ndarray]:
        set_packed(on)
        t0 = time.perf_counter()
        vecs = emb.encode_products(products, batch_size=args.batch)
        return time.perf_counter() - t0, vecs

    def step(on: bool) -> float:
        set_packed(on)
        emb.train()
        emb.zero_grad(set_to_none=True)
        q_items, p_items = emb.build_query_inputs(queries), emb.build_product_inputs(bought)
        t0 = time.perf_counter()
        forward_backward(emb, q_items, p_items, loss_fn, chunk_size=None, aux_weight=0.0, autocast=autocast)
        return time.perf_counter() - t0

    step(True), step(False)  # warm-up of the training path
    times: dict[str, dict[str, list[float]]] = {
        "encode": {"packed": [], "padded": []},
        "step": {"packed": [], "padded": []},
    }
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, on in (("packed", True), ("padded", False)):
            seconds, vectors[name] = encode(on)
            times["encode"][name].append(seconds)
        for name, on in (("packed", True), ("padded", False)):
            times["step"][name].append(step(on))
    med = {part: {k: statistics.median(v) for k, v in d.items()} for part, d in times.items()}
    q_items, p_items = emb.build_query_inputs(queries), emb.build_product_inputs(bought)
    q_len, p_len = [len(x) for x in q_items], [len(x) for x in p_items]
    step_padding = 1.0 - (sum(q_len) + sum(p_len)) / (len(q_len) * max(q_len) + len(p_len) * max(p_len))
    result: dict[str, Any] = {
        "benchmark": "packed_graft",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "precision": args.precision,
        "threads": args.threads,
        "products": len(products),
        "batch": args.batch,
        "train_batch": n,
        "repeats": args.repeats,
        "padding_share_encode": round(padding_share(emb, items, args.batch), 4),
        "padding_share_step": round(step_padding, 4),
        "seconds": times,
        "median_s": med,
        "speedup": {part: round(m["padded"] / m["packed"], 3) for part, m in med.items()},
        "products_per_s": {k: round(len(products) / v, 2) for k, v in med["encode"].items()},
        "max_abs_vector_difference": float(np.abs(vectors["packed"] - vectors["padded"]).max()),
        "machine": {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
                    "torch": torch.__version__},
    }  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"packed_graft-{args.tag}"
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Packed vs padded: {args.preset}, {args.precision}, {args.threads} threads ({result['date']})",
        "",
        f"{len(products)} products (batch {args.batch}, warm features) and one training step of {n} queries + "
        f"{n} products; median of {args.repeats}, packed and padded in turn in one process.",
        "",
        "| part | padded s | packed s | speed-up | padding share |",
        "|---|---|---|---|---|",
        f"| encode (warm) | {med['encode']['padded']:.2f} | {med['encode']['packed']:.2f} | {result['speedup']['encode']:.2f}× "
        f"| {result['padding_share_encode']:.0%} |",
        f"| train step (forward + backward) | {med['step']['padded']:.2f} | {med['step']['packed']:.2f} | "
        f"{result['speedup']['step']:.2f}× | {result['padding_share_step']:.0%} (the query batch and the product batch) |",
        "",
        f"Largest difference of a vector coordinate, packed vs padded: {result['max_abs_vector_difference']:.2e}.",
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
