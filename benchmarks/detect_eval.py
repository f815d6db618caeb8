"""Score every available detector on a store's test images and write the numbers as JSON.

    python benchmarks/detect_eval.py --data STORE --learned MODEL_DIR --out benchmarks/results/detect.json

Runs ``moon.regions.evaluate_detector`` for ``saliency`` and, when given, ``learned`` (and
``grounding`` with ``--grounding``); prints the per-kind tables.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from moon.regions import evaluate_detector, load_detector
from moon.regions.evaluate import format_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--learned", help="learned detector directory")
    ap.add_argument("--grounding", help="Qwen2.5-VL directory or hub id")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-per-kind", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"saliency": None, "learned": args.learned, "grounding": args.grounding}
    results = {"machine": f"{platform.machine()} {platform.processor()} torch threads {args.threads}", "detectors": {}}
    for name, model in runs.items():
        if name != "saliency" and not model:
            continue
        report = evaluate_detector(
            args.data, load_detector(name, model), split=args.split, max_per_kind=args.max_per_kind
        )
        print(format_report(report), flush=True)
        results["detectors"][name] = report.as_dict()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
