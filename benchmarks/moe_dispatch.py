"""What the guided MoE costs against the dense model, and against the FLOP floor of its layout.

Slice 5 of the fast-path issue. Two parts, each side by side in one process (A B A B …, ``--repeats``
rounds, medians):

* **layer**: one MoE layer of ``--preset`` against its dense MLP (the layer's shared expert *is* the
  dense MLP it was upcycled from), on the hidden states and aspect tags that reach that layer in a
  real encode batch and in a real training batch; forward (inference mode) and forward + backward.
  The MoE layer runs the always-on shared expert on every token plus ``top_k`` aspect experts on
  each token (each a copy of the dense MLP), so its FLOP floor is ``1 + top_k`` dense MLPs plus the
  router; the dispatch variants ``loop`` (one matmul per expert over the tokens sorted by expert) and
  ``grouped_mm`` (one ``torch.nn.functional.grouped_mm`` per projection, where this torch runs it)
  are timed beside it.
* **model**: ``encode_products`` of ``--products`` products (image features warm: the MoE changes the
  LM, not the image encoder) and one training step (forward + backward of ``--train-batch`` queries
  and their products through ``moon.train.chunked.forward_backward``), the MoE model against the same
  preset built with ``moe_mode="dense"``; beside it the ratio of the LM matmul FLOPs of the two
  (``benchmarks/profile_encode_train.lm_flops`` on the real token counts): the floor of the ratio
  for the LM part of the work.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe_dispatch.py --tag 2026-12-08
    .venv/bin/python benchmarks/moe_dispatch.py --preset moon-graft-tiny --products 16 --repeats 1 --tag smoke

Writes ``benchmarks/results/moe_dispatch-<tag>.{json,md}``; the world and crops are those of
``benchmarks/profile_encode_train.py`` (same ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def capture_layer_inputs(emb, layer, run) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states ``(N, H)`` and aspect tags ``(N,)`` that reach ``layer`` during ``run()``
    (the first forward's)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args):
        if not seen:
            x = args[0]
            seen.append((x.detach().reshape(-1, x.shape[-1]).clone(), emb.routing.aspect_ids.reshape(-1).clone()))

    handle = layer.register_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def layer_part(emb, layer, x: torch.Tensor, tags: torch.Tensor, repeats: int, autocast) -> dict[str, Any]:
    """Medians of the MoE layer (per dispatch) and of its dense MLP on ``x``, forward and fwd + bwd."""
    from moon.model import moe

    dispatches = ["loop"]
    usable_fwd_bwd = moe.grouped_mm_works(x.device, x.dtype)
    if hasattr(torch.nn.functional, "grouped_mm"):
        dispatches.append("grouped_mm")
    variants = [("dense MLP", None)] + [(f"MoE {d}", d) for d in dispatches]
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "forward+backward": []} for name, _ in variants}
    saved = dict(moe._GROUPED_MM)

    def call(dispatch: str | None, grad: bool) -> None:
        xi = x.clone().requires_grad_(grad)
        ctx = torch.enable_grad() if grad else torch.inference_mode()
        with ctx, autocast(), emb.routing.using(tags, recomputing=True):
            if dispatch is None:
                out = layer.shared(xi)
            else:
                emb.routing.dispatch = dispatch
                out = layer(xi)
            if grad:  # a dense upstream gradient (what the next layer hands back)
                out.float().square().sum().backward()

    try:
        # the grouped GEMM is timed where it runs at all (forward, dense backward), whether or not
        # ``auto`` would pick it here (it checks a stride-0 upstream gradient too)
        moe._GROUPED_MM[(x.device.type, x.dtype)] = True
        for _name, d in variants:  # warm-up
            call(d, False), call(d, True)
        for r in range(repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for name, d in order:
                times[name]["forward"].append(_timed(lambda d=d: call(d, False)))
                times[name]["forward+backward"].append(_timed(lambda d=d: call(d, True)))
    finally:
        moe._GROUPED_MM.clear()
        moe._GROUPED_MM.update(saved)
        emb.routing.dispatch = emb.config.moe_dispatch
        layer.zero_grad(set_to_none=True)
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}
    with torch.inference_mode(), emb.routing.using(tags, recomputing=True):
        routed = torch.bincount(layer.route(x)[3].reshape(-1), minlength=len(layer.experts)).tolist()
    hid = layer.router.in_features
    inter = layer.shared.gate_proj.out_features
    n, k = x.shape[0], layer.top_k
    dense_flops = 6 * n * hid * inter
    moe_flops = dense_flops * (1 + k) + 2 * n * hid * (len(layer.experts) + 1)
    return {
        "tokens": n,
        "top_k": k,
        "experts": len(layer.experts),
        "routed_per_expert": routed,
        "grouped_mm_auto": usable_fwd_bwd,
        "median_s": med,
        "flop_floor_ratio": moe_flops / dense_flops,
        "ratio_to_dense": {
            name: {part: med[name][part] / med["dense MLP"][part] for part in ("forward", "forward+backward")}
            for name in med
            if name != "dense MLP"
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from profile_encode_train import (
        LMShape,
        lm_flops,
        load_1min,
        machine_facts,
        open_world,
        pick_train_batch,
        truth_crops,
        with_crops,
    )

    from moon.model import MoonEmbedder
    from moon.model.moe import moe_layers
    from moon.train.chunked import forward_backward
    from moon.train.losses import ContrastiveLoss

    torch.set_num_threads(args.threads)
    load_start = load_1min()
    out = Path(args.out)
    store = open_world(out, args.products, args.seed)
    crops = truth_crops(store, out / f"crops-{args.products}-s{args.seed}")
    products = [with_crops(p, crops) for p in store.products()[: args.products]]
    queries, bought = pick_train_batch(store, crops, args.train_batch, args.seed)
    models = {
        "moe": MoonEmbedder.from_pretrained(args.preset, device="cpu", precision=args.precision),
        "dense": MoonEmbedder.from_pretrained(args.preset, device="cpu", precision=args.precision, moe_mode="dense"),
    }
    if not moe_layers(models["moe"]):
        raise SystemExit(f"{args.preset}: no MoE layer (moe_mode={models['moe'].config.moe_mode})")
    for emb in models.values():
        emb.encode_products(products, batch_size=args.batch)  # fills the feature cache; allocator, kernels

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    loss = ContrastiveLoss(0.05)
    n = len(queries)
    allowed, positive = torch.ones(n, n, dtype=torch.bool), torch.arange(n)

    def loss_fn(q, p):
        return loss(q, p, allowed, positive).sum() / n, {}

    def step(emb) -> None:
        emb.train()
        emb.zero_grad(set_to_none=True)
        q_items, p_items = emb.build_query_inputs(queries), emb.build_product_inputs(bought)
        forward_backward(emb, q_items, p_items, loss_fn, chunk_size=None, aux_weight=0.0, autocast=autocast)
        emb.eval()

    # -- layer part -----------------------------------------------------------------------
    moe_emb = models["moe"]
    layer = moe_layers(moe_emb)[0]
    items = moe_emb.build_product_inputs(products[: args.batch])
    with torch.inference_mode():
        x_enc, t_enc = capture_layer_inputs(moe_emb, layer, lambda: moe_emb(moe_emb.collate(items)))
    x_step, t_step = capture_layer_inputs(moe_emb, layer, lambda: step(moe_emb))
    layers = {
        f"encode batch ({args.batch} products)": layer_part(moe_emb, layer, x_enc, t_enc, args.repeats, autocast),
        f"train batch ({n} queries + {n} products, first side)": layer_part(
            moe_emb, layer, x_step, t_step, args.repeats, autocast
        ),
    }

    # -- model part -----------------------------------------------------------------------
    step(models["moe"]), step(models["dense"])  # warm-up of the training path
    times: dict[str, dict[str, list[float]]] = {"encode": {"moe": [], "dense": []}, "step": {"moe": [], "dense": []}}
    for r in range(args.repeats):
        order = ("moe", "dense") if r % 2 == 0 else ("dense", "moe")
        for name in order:
            emb = models[name]
            times["encode"][name].append(_timed(lambda emb=emb: emb.encode_products(products, batch_size=args.batch)))
        for name in order:
            times["step"][name].append(_timed(lambda name=name: step(models[name])))
    med = {part: {k: statistics.median(v) for k, v in d.items()} for part, d in times.items()}
    enc_len = [len(x) for x in moe_emb.build_product_inputs(products)]
    step_len = [len(x) for x in moe_emb.build_query_inputs(queries)] + [
        len(x) for x in moe_emb.build_product_inputs(bought)
    ]
    floor = {}
    for part, lengths in (("encode", enc_len), ("step", step_len)):
        f_moe = lm_flops(LMShape.of(models["moe"]), lengths)["total"]
        f_dense = lm_flops(LMShape.of(models["dense"]), lengths)["total"]
        floor[part] = f_moe / f_dense
    shape = LMShape.of(moe_emb)
    result: dict[str, Any] = {
        "benchmark": "moe_dispatch",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "precision": args.precision,
        "threads": args.threads,
        "torch": torch.__version__,
        "lm_layers": list(shape.layer_kinds),
        "moe_top_k": shape.top_k,
        "products": len(products),
        "batch": args.batch,
        "train_batch": n,
        "repeats": args.repeats,
        "layer": layers,
        "model": {
            "seconds": times,
            "median_s": med,
            "ratio_moe_to_dense": {part: m["moe"] / m["dense"] for part, m in med.items()},
            "lm_flop_ratio_floor": floor,
        },
        "machine": {**machine_facts(), "load_1min_start": load_start, "load_1min_end": load_1min()},
    }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"moe_dispatch-{args.tag}"
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    print(md)
    return result


def markdown(r: dict[str, Any]) -> str:
    kinds = r["lm_layers"]
    lines = [
        f"# Guided MoE vs dense: {r['preset']}, {r['precision']}, {r['threads']} threads ({r['date']})",
        "",
        f"LM layers: {', '.join(kinds)} (top-k {r['moe_top_k']}); torch {r['torch']}; {r['machine']['cpu_model']} (1-min load "
        f"{r['machine']['load_1min_start']} at start, {r['machine']['load_1min_end']} at end). Median of "
        f"{r['repeats']}, variants in turn in one process.",
        "",
        "## One MoE layer against its dense MLP, on the tokens a real batch routes through it",
        "",
        "| batch | tokens | variant | forward s | ratio | fwd+bwd s | ratio | FLOP floor |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for batch, part in r["layer"].items():
        med = part["median_s"]
        for name in med:
            ratio = part["ratio_to_dense"].get(name)
            lines.append(
                f"| {batch} | {part['tokens']} | {name} | {med[name]['forward']:.4f} | "
                + (f"{ratio['forward']:.2f}×" if ratio else "1") + f" | {med[name]['forward+backward']:.4f} | "
                + (f"{ratio['forward+backward']:.2f}×" if ratio else "1") + " | "
                + (f"{part['flop_floor_ratio']:.2f}×" if ratio else "1") + " |"
            )  # fmt: skip
        lines.append(
            f"| {batch} | | `auto` picks the grouped GEMM here | {'yes' if part['grouped_mm_auto'] else 'no'} | | | | |"
        )
    m = r["model"]
    lines += [
        "",
        "## The whole model: MoE preset against the same preset with `moe_mode=dense`",
        "",
        "| part | dense s | MoE s | MoE / dense | LM FLOP ratio (floor of the LM part) |",
        "|---|---:|---:|---:|---:|",
    ]
    for part, label in (("encode", f"encode {r['products']} products (warm)"), ("step", "train step (fwd + bwd)")):
        lines.append(
            f"| {label} | {m['median_s'][part]['dense']:.3f} | {m['median_s'][part]['moe']:.3f} | "
            f"{m['ratio_moe_to_dense'][part]:.2f}× | {m['lm_flop_ratio_floor'][part]:.2f}× |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
