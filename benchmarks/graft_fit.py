"""What makes the pretrained graft (moon-smol) learn on a 2-core CPU: variants side by side.

Every variant is trained on the same product world with the same steps, batch and negatives (the
demo's stages: world → learned detector → train → evaluate, cached under ``--out``), then scored on
the test split. Writes ``benchmarks/results/graft_fit-<tag>.json`` (and ``.md``) with, per variant:
seconds per step (median over the run), test Recall@10 per retrieval task, mean classification /
attribute accuracy, the first and last logged product cosine and loss, and peak RSS.

    .venv/bin/python benchmarks/graft_fit.py --variants smol,smol-frozen8,two-tower --tag 2026-12-02
    .venv/bin/python benchmarks/graft_fit.py --list

Variants are defined in ``VARIANTS`` below (a demo ``ModelRun`` each). The machine is noisy: compare
within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moon.demo.ablate import summary_scores
from moon.demo.pipeline import DemoConfig, ModelRun, _detector, _evaluate, _slug, _train, _world
from moon.demo.stages import StageRunner
from moon.precision import native_bf16

# the trainer's "auto" means bf16 on CUDA only; on a CPU with native bf16 ask for it
BF16 = {"run.precision": "bf16" if native_bf16() else "fp32"}


def _smol(name: str, overrides: dict[str, Any] | None = None, **train: Any) -> ModelRun:
    return ModelRun(name, "moon-smol", overrides=dict(overrides or {}), train_overrides={**BF16, **train})


VARIANTS: dict[str, ModelRun] = {
    # the learning rate: a pretrained LM wants a small one, the new projector a larger one
    "smol": _smol("smol", **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    "smol-lr5e-4": _smol("smol-lr5e-4", **{"optim.lr": 5e-4}),
    "smol-lr3e-5": _smol("smol-lr3e-5", **{"optim.lr": 3e-5, "optim.lr_scale": {"projector": 30.0}}),
    # what to train: frozen lower layers, LoRA
    "smol-frozen8": _smol(
        "smol-frozen8", **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}, "model.freeze_lower_layers": 8}
    ),
    "smol-lora": _smol(
        "smol-lora", **{"optim.lr": 5e-4, "optim.lr_scale": {"projector": 2.0}, "model.lora": {"r": 16, "alpha": 32}}
    ),
    # how big: LM depth kept, visual tokens per image
    "smol-keep6": _smol("smol-keep6", {"graft": {"keep_layers": 6}, "moe_layers": [-3, -2, -1]},
                        **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    "smol-tokens1": _smol("smol-tokens1", {"graft": {"image_tokens": 1}},
                          **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    "smol-tokens9": _smol("smol-tokens9", {"graft": {"image_tokens": 9}},
                          **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    "smol-nocenter": _smol("smol-nocenter", {"center": False},
                           **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    "smol-fp32": _smol("smol-fp32", {"precision": "fp32"},
                       **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}, "run.precision": "fp32"}),
    # the recipe's stability (a run that learns, then drifts back towards chance): which shared
    # knob drives the drift — the memory queue, its entries' age, the learning rate
    "smol-queue256": _smol("smol-queue256", **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0},
                                                "negatives.queue_size": 256, "negatives.queue_max_age": 8}),
    "smol-noqueue": _smol("smol-noqueue", **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0},
                                              "negatives.queue_size": 0}),
    # (the three below keep the 256-vector queue: can it be kept stable?)
    "smol-age2": _smol("smol-age2", **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0},
                                        "negatives.queue_size": 256, "negatives.queue_max_age": 2}),
    "smol-lr3e-5-p10": _smol("smol-lr3e-5-p10", **{"optim.lr": 3e-5, "optim.lr_scale": {"projector": 10.0},
                                                    "negatives.queue_size": 256, "negatives.queue_max_age": 8}),
    "smol-tau-learn": _smol("smol-tau-learn", **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0},
                                                  "negatives.queue_size": 256, "negatives.queue_max_age": 8,
                                                  "loss.learn_temperature": True}),
    # the text→product gap (claims issue, part 1): equal text budgets first (moon-smol keeps 64
    # text tokens, the two-tower 128), then the LM depth kept
    "smol-text128": _smol("smol-text128", {"max_text_tokens": 128},
                          **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    "smol-keep12": _smol("smol-keep12", {"graft": {"keep_layers": 12}, "moe_layers": [-3, -2, -1]},
                         **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    # the share of visual vs text tokens in the pooled vector: pooled apart and mixed half and half
    # (the two-tower's late fusion, inside one sequence)
    "smol-modality": _smol("smol-modality", {"pooling": "modality"},
                           **{"optim.lr": 1e-4, "optim.lr_scale": {"projector": 10.0}}),
    "two-tower-text64": ModelRun("two-tower-text64", "two-tower", overrides={"max_text_tokens": 64}, crops=False,
                                 train_overrides={**BF16, "optim.lr": 1e-4, "optim.lr_scale": {"head": 10.0}}),
    # the real bar for MOON's text side: MiniLM + EfficientNet features with trained heads
    "pretrained-towers": ModelRun("pretrained-towers", "pretrained-towers", crops=False, train_overrides=dict(BF16)),
    # the equal-start baseline (same image encoder + LM) and the floor
    "two-tower": ModelRun("two-tower", "two-tower", crops=False,
                          train_overrides={**BF16, "optim.lr": 1e-4, "optim.lr_scale": {"head": 10.0}}),
    "random": ModelRun("random", "random", crops=False, train=False),
}


def _step_seconds(run_dir: Path, batch: int, warmup: int | None = None) -> dict[str, Any]:
    from moon.train.metrics_log import read_metrics

    records = read_metrics(run_dir)
    recs = [r for r in records if "loss" in r]
    times = [batch / r["samples_per_s"] for r in recs if r.get("samples_per_s")]
    cos = [r["product_cosine"] for r in recs if isinstance(r.get("product_cosine"), (int, float))]
    out: dict[str, Any] = {
        "median_step_s": statistics.median(times[2:] or times) if times else None,
        "loss_first": recs[0]["loss"] if recs else None,
        "loss_last": recs[-1]["loss"] if recs else None,
        "chance_loss": recs[-1].get("chance_loss") if recs else None,
        "product_cosine_first": cos[0] if cos else None,
        "product_cosine_last": cos[-1] if cos else None,
        "product_cosine_max": max(cos) if cos else None,
        "val_recall@10": [r["val_recall@10"] for r in records if r.get("val_recall@10") is not None],
        # stability: the validation curve with its steps, the best step, the cosine after warm-up
        "val_curve": [[r["step"], r["val_recall@10"]] for r in records if r.get("val_recall@10") is not None],
        "grad_norm_max": max((r["grad_norm"] for r in recs if r.get("grad_norm") is not None), default=None),
    }
    if out["val_curve"]:
        out["best_step"] = max(out["val_curve"], key=lambda sr: sr[1])[0]
    if warmup is not None:
        after = [r["product_cosine"] for r in recs
                 if r["step"] > warmup and isinstance(r.get("product_cosine"), (int, float))]
        out["product_cosine_max_after_warmup"] = max(after) if after else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="smol,two-tower,random", help="comma-separated names from VARIANTS")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--out", default="graft-fit-out", help="stage directory (cached; re-runs reuse finished work)")
    ap.add_argument("--products", type=int, default=500)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="small", choices=("small", "default", "large"),
                    help="the world's profile (images and queries per product; moon.world.synth.PROFILES)")
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--val-every", type=int, default=None,
                    help="validate every N steps (default: the demo's, a third of the run)")
    args = ap.parse_args(argv)
    if args.list:
        for name, run in VARIANTS.items():
            print(f"{name:16s} {run.spec:12s} {run.overrides} {run.train_overrides}")
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; --list shows them")

    cfg = DemoConfig(products=args.products, steps=args.steps, seed=args.seed, profile=args.profile, models=[])
    from moon.model.feature_store import default_root

    with default_root(Path(args.out) / "feature-cache"):  # image features once per image, across runs
        return _run(args, names, cfg)


def _run(args: argparse.Namespace, names: list[str], cfg: DemoConfig) -> int:
    runner = StageRunner(Path(args.out) / "stages", log=print)
    world = runner.run("world", {"products": cfg.products, "seed": cfg.seed, "profile": cfg.profile},
                       lambda d: _world(d, cfg))
    store_dir = world.outputs["store"]
    detector = runner.run(
        "detector",
        {"epochs": cfg.detector_epochs, "max_images": cfg.detector_max_images, "seed": cfg.seed, "design": 2},
        lambda d: _detector(d, store_dir, cfg),
        after=[world],
    )
    results: dict[str, Any] = {}
    for name in names:
        run = VARIANTS[name]
        if args.val_every and run.train:
            run = replace(run, train_overrides={**run.train_overrides, "run.val_every": args.val_every})
        slug = _slug(name)
        rec: dict[str, Any] = {"spec": run.spec, "overrides": run.overrides, "train_overrides": run.train_overrides}
        trained = None
        if run.train:
            trained = runner.run(
                f"train-{slug}",
                {"run": run.__dict__, "steps": cfg.steps, "batch": cfg.batch_size, "seed": cfg.seed,
                 "hard": cfg.hard_negatives, "queue": cfg.queue_size},
                lambda d, run=run: _train(d, run, cfg, store_dir),
                after=[world, detector] if run.crops else [world],
            )
            rec["train_wall_s"] = round(trained.seconds, 1)  # the stage's own time (kept when it is cached)
            rec.update(_step_seconds(Path(trained.outputs["run"]), cfg.batch_size, max(1, cfg.steps // 10)))
            rec["scored_checkpoint"] = trained.outputs.get("checkpoint", {}).get("name")
        evaluated = runner.run(
            f"eval-{slug}",
            {"run": run.__dict__, "max_queries": cfg.eval_max_queries, "seed": cfg.seed},
            lambda d, run=run, trained=trained: _evaluate(d, run, cfg, store_dir, trained),
            after=([trained] if trained else [world]) + [detector],
        )
        rec["eval_wall_s"] = round(evaluated.seconds, 1)
        res = json.loads(Path(evaluated.outputs["results"]).read_text(encoding="utf-8"))
        rec["test"] = summary_scores(res)
        rec["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        results[name] = rec
        print(f"[graft_fit] {name}: {json.dumps(rec['test'])} step {rec.get('median_step_s')}", flush=True)
        _write(args, cfg, results)
    return 0


def _write(args: argparse.Namespace, cfg: DemoConfig, results: dict[str, Any]) -> None:
    import platform

    import torch

    from moon.precision import native_bf16

    out = Path(__file__).parent / "results" / f"graft_fit-{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "native_bf16": native_bf16(), "torch": torch.__version__},
        "world": {"products": cfg.products, "seed": cfg.seed, "profile": cfg.profile},
        "budget": {"steps": cfg.steps, "batch": cfg.batch_size, "hard": cfg.hard_negatives, "queue": cfg.queue_size},
    }
    prev = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    if not results and "machine" in prev:  # re-writing the tables only: keep the machine the runs had
        meta["machine"] = prev["machine"]
    merged = {**prev.get("variants", {}), **results}
    out.write_text(json.dumps({**meta, "variants": merged}, indent=2), encoding="utf-8")
    keys = sorted({k for r in merged.values() for k in r.get("test", {})})
    lines = [f"World: {cfg.products} products, seed {cfg.seed}. Budget: {cfg.steps} steps × batch {cfg.batch_size}, "
             f"hard {cfg.hard_negatives}, demo queue {cfg.queue_size} (a variant's train_overrides win; see the JSON). "
             f"Machine: {meta['machine']}.", "",
             "| variant | s/step | " + " | ".join(keys) + " | cos first→last | cos max after warm-up "
             "| loss last (chance) | val R@10 by step | best step |",
             "|---" * (len(keys) + 7) + "|"]
    for name, r in merged.items():
        def f(x: Any, p: int = 3) -> str:
            return "–" if x is None else f"{x:.{p}f}"
        lines.append(
            f"| {name} | {f(r.get('median_step_s'), 2)} | " + " | ".join(f(r['test'].get(k)) for k in keys)
            + f" | {f(r.get('product_cosine_first'))}→{f(r.get('product_cosine_last'))}"
            + f" | {f(r.get('product_cosine_max_after_warmup'))}"
            + f" | {f(r.get('loss_last'), 2)} ({f(r.get('chance_loss'), 2)})"
            + " | " + (", ".join(f"{s}: {100 * v:.0f}" for s, v in r.get("val_curve", [])) or "–")
            + f" | {r.get('best_step', '–')} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
