"""Where the time of a graft embedder (default ``moon-smol``) goes on this CPU, row by row.

Slice 1 of the fast-path issue (profile). Three parts, each a table whose rows sum to its total:

* **encode, cold** — ``MoonEmbedder.encode_products`` (the public path) on ``--products`` products of a
  product world, batch ``--batch``, with the process-wide frozen image-feature cache
  (``moon.model.graft.FEATURE_CACHE``) emptied first: every image is decoded, preprocessed and run
  through the frozen image encoder;
* **encode, warm** — the same call with the cache filled (what re-encoding, and training after the
  first epoch, pay);
* **train step** — one contrastive step as the trainer takes it: ``build_query_inputs`` /
  ``build_product_inputs`` for ``--train-batch`` queries and their purchased products,
  ``moon.train.chunked.forward_backward`` (forward of both sides, in-batch InfoNCE with
  ``moon.train.losses.ContrastiveLoss``, the MoE auxiliary loss, backward), gradient clipping and an
  AdamW step (``moon.train.optim.build_optimizer``, the demo recipe: lr 1e-4, lr_scale {projector: 10}).

Each part runs ``--repeats`` times after one warm-up; the tables show the run with the median total
(the JSON also has every run's total and each row's median over the runs).

Instruments (non-invasive: nothing of the library is replaced or patched):

* forward pre/post hooks on the embedder, the graft backbone, its projector, its LM, the image encoder
  and every decoder layer's ``self_attn`` and ``mlp`` (the guided MoE where upcycled).
  ``encode_products`` calls ``self.forward`` directly, so the embedder's own hooks fire in training
  only: in the encode tables the pooling head (pool, centre, normalise) is part of "other";
* for the backward of ``self_attn`` / ``mlp`` / the LM: gradient hooks (``Tensor.register_hook``) on
  each module's output (its gradient arrives: the module's backward starts) and on its input (its
  gradient is complete: the module's backward is done), registered from the forward hooks; for the
  token embedding, pre/post hooks on its ``EmbeddingBackward`` autograd node. Full module backward
  hooks do not work here: the decoder layers call ``self_attn(hidden_states=...)`` by keyword, and
  ``register_full_backward_hook`` only tracks positional inputs, so it fires before the module's
  backward has run;
* ``time.perf_counter`` around the public calls, and ``torch.profiler.record_function`` labels
  around the phases (seen in a ``--trace`` Chrome trace);
* measured separately, once, on the same records: ``moon.data.load_image`` (image decode), the
  encoder's ``preprocess`` (resize + normalise) and ``MoonEmbedder.collate`` inside
  ``encode_products`` (the encode loop builds and collates without a public call in between).

FLOPs of the LM part are counted from the architecture (see :func:`lm_flops`) for the actual token
counts of each forward, unpadded (useful work) and padded (what the padded batch computes).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_encode_train.py                 # moon-smol, 200 products
    .venv/bin/python benchmarks/profile_encode_train.py --precision fp32 --tag fp32-run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_encode_train.py --quick         # smoke: moon-graft-tiny

Writes ``benchmarks/results/profile-<tag>.{json,md}`` (tag: ``--tag``, else today's date) and prints
the Markdown. The world is synthesised once into ``--out`` (default ``profile-out/``) and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: the trainer's default modality mix of a batch (moon.train.config.DataConfig.modality_mix)
MODALITY_MIX = {"image": 12.0, "text": 3.0, "multimodal": 2.0}
#: ``MoonEmbedder._encode`` builds and length-sorts this many records (× the batch size) at a time
#: (src/moon/model/embedder.py); used only to attribute the gaps between forwards, and checked
ENCODE_WINDOW_BATCHES = 16

# row keys, in display order before sorting; per-layer rows are "L<i>.self_attn" / "L<i>.mlp"
INPUT_ROWS = ("decode", "preprocess", "image_encoder", "input_building", "collate")
HEAD_ROWS = ("projector", "graft_glue", "lm_rest", "head")
TRAIN_ROWS = ("loss", "backward_rest", "grad_clip", "optimizer")
LABELS = {
    "decode": "image decode (moon.data.load_image)",
    "preprocess": "image preprocess (resize + normalise)",
    "image_encoder": "image encoder (frozen, fp32, no grad)",
    "input_building": "input building: tokenisation, feature cache, pooling",
    "collate": "collate",
    "projector": "projector",
    "graft_glue": "graft glue: token embeddings, visual-token scatter",
    "lm_rest": "LM rest: causal mask, rotary, RMSNorms, residual adds",
    "head": "pooling / centre / projection / normalise head",
    "loss": "loss (in-batch InfoNCE)",
    "backward_rest": "backward rest: loss, head, visual-token scatter, projector, gradient accumulation",
    "bwd:embed_tokens": "backward token embeddings (dense gradient of the whole table)",
    "bwd:lm_rest": "backward LM rest: RMSNorms, residual adds",
    "grad_clip": "grad clip (clip_grad_norm_ 1.0)",
    "optimizer": "optimizer: zero_grad + AdamW step + LR schedule",
    "other": "other (Python overhead)",
    "other_encode": "other (Python overhead, pooling/normalise head, copy-out)",
}
HOW = {
    "decode": "separate",
    "preprocess": "separate",
    "image_encoder": "hook",
    "input_building": "perf_counter − parts",
    "collate": "perf_counter/hooks",
    "projector": "hook",
    "graft_glue": "hooks (backbone − lm − projector)",
    "lm_rest": "hooks (lm − blocks)",
    "head": "hooks (embedder − backbone)",
    "loss": "perf_counter",
    "backward_rest": "perf_counter − grad hooks (LM)",
    "bwd:lm_rest": "grad hooks (lm − blocks)",
    "bwd:embed_tokens": "autograd node hooks",
    "grad_clip": "perf_counter",
    "optimizer": "perf_counter",
    "other": "total − rows",
}


# --------------------------------------------------------------------------- machine


def cpu_facts() -> dict[str, Any]:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": any(f.startswith("amx") for f in flags),
        "amx_flags": sorted(f for f in flags if f.startswith("amx")),
        "cpu_count": os.cpu_count(),
    }


def load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_facts() -> dict[str, Any]:
    import transformers

    import moon

    return {
        **cpu_facts(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moon": moon.__version__,
        "python": platform.python_version(),
    }


def matmul_peak(sizes: Sequence[int], dtypes: Sequence[str], repeats: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Median GFLOP/s of ``torch.matmul`` of square ``n × n`` matrices (2·n³ FLOPs), per dtype and size,
    at the current thread count (one untimed warm-up each)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, Any]] = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        per: dict[str, Any] = {}
        for n in sizes:
            a = torch.randn(n, n, generator=gen).to(dtype)
            b = torch.randn(n, n, generator=gen).to(dtype)
            torch.matmul(a, b)
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t0)
            per[str(n)] = {
                "gflops_median": 2 * n**3 / statistics.median(times) / 1e9,
                "seconds": times,
            }
        per["best_gflops"] = max(v["gflops_median"] for k, v in per.items() if k.isdigit())
        out[name] = per
    return out


# --------------------------------------------------------------------------- world and records


def open_world(out: Path, n_products: int, seed: int):
    """The product world of ``n_products`` (synthesised once under ``out``, then reused)."""
    from moon.data import ProductStore
    from moon.world import synthesize

    root = out / f"world-{n_products}-s{seed}"
    if (root / "manifest.json").exists():
        return ProductStore(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    return synthesize(root, n_products=n_products, seed=seed, show_progress=False)


def truth_crops(store, crop_dir: Path) -> dict[str, str | None]:
    """Absolute image path → its core-region crop file (or ``None``): the store's truth box, padded
    and filtered by the default ``moon.regions.crop_policy.CropPolicy`` (as for a detector's boxes),
    cropped and saved once as JPEG under ``crop_dir`` (file paths, so that the feature cache keys them)."""
    from PIL import Image

    from moon.data import load_image
    from moon.regions.base import Detection
    from moon.regions.crop_policy import CropPolicy, crop_image

    policy = CropPolicy()
    crop_dir.mkdir(parents=True, exist_ok=True)
    crops: dict[str, str | None] = {}
    for box in store.iter_boxes("truth"):
        src = store.root / box.image
        if str(src) in crops:
            continue
        with Image.open(src) as im:
            size = im.size
        chosen = policy.choose([Detection(box.xyxy, 1.0)], size)
        if chosen is None:
            crops[str(src)] = None
            continue
        dest = crop_dir / (Path(box.image).with_suffix("").as_posix().replace("/", "__") + ".jpg")
        if not dest.exists():
            tmp = dest.with_suffix(".tmp.jpg")
            crop_image(load_image(src), chosen).save(tmp, format="JPEG", quality=90)
            os.replace(tmp, dest)
        crops[str(src)] = str(dest)
    return crops


def with_crops(record, crops: dict[str, str | None]):
    aligned = [crops.get(str(x)) for x in record.images]
    return replace(record, crops=aligned if any(c is not None for c in aligned) else [])


def _quotas(n: int, mix: dict[str, float]) -> dict[str, int]:
    total = sum(mix.values())
    raw = {k: n * v / total for k, v in mix.items()}
    out = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: n - sum(out.values())]:
        out[k] += 1
    return out


def pick_train_batch(store, crops: dict[str, str | None], n: int, seed: int) -> tuple[list, list]:
    """``n`` queries (train split first, the trainer's 12:3:2 image:text:multimodal mix where the world
    has them) with distinct purchased products, and those products (crops attached to both)."""
    bought: dict[str, str] = {}
    for p in store.purchases():
        bought.setdefault(str(p.query_id), str(p.product_id))
    queries = [q for q in store.queries() if q.id in bought and q.modality != "empty"]
    rng = random.Random(seed)
    rng.shuffle(queries)
    queries.sort(key=lambda q: q.split != "train")  # stable: train split first, shuffled within
    quota = _quotas(n, MODALITY_MIX)
    chosen, used = [], set()
    for strict in (True, False):
        for q in queries:
            if len(chosen) >= n:
                break
            if q in chosen or bought[q.id] in used:
                continue
            if strict and quota.get(q.modality, 0) <= 0:
                continue
            chosen.append(q)
            used.add(bought[q.id])
            quota[q.modality] = quota.get(q.modality, 0) - 1
    if len(chosen) < 2:
        raise SystemExit(f"the world has only {len(chosen)} queries with distinct purchased products; need >= 2")
    products = [with_crops(store.product(bought[q.id]), crops) for q in chosen]
    return [with_crops(q, crops) for q in chosen], products


# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class LMShape:
    """What the LM's matmul FLOPs depend on (read from the built model)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layer_kinds: tuple[str, ...]  # "dense" or "moe", per decoder layer
    experts: int  # aspect experts per MoE layer (the shared expert is extra)
    top_k: int

    @classmethod
    def of(cls, emb) -> LMShape:
        from moon.model.moe import GuidedMoE

        lm = emb.family.text_model(emb.backbone)
        cfg = lm.config
        heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
        kinds, experts = [], 0
        for layer in lm.layers:
            if isinstance(layer.mlp, GuidedMoE):
                kinds.append("moe")
                experts = len(layer.mlp.experts)
            else:
                kinds.append("dense")
        return cls(
            hidden=int(cfg.hidden_size),
            intermediate=int(cfg.intermediate_size),
            heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            layer_kinds=tuple(kinds),
            experts=experts,
            top_k=int(emb.config.moe_top_k),
        )


def lm_flops(shape: LMShape, lengths: Sequence[int], padded_to: int | None = None) -> dict[str, int]:
    """Matmul FLOPs of one LM forward over sequences of ``lengths`` tokens (each padded to
    ``padded_to`` when given: what a right-padded batch computes), 2·m·n·k per linear layer.

    Per decoder layer, with n = Σ tokens, H hidden, I intermediate, h heads of d dims, g KV heads:
    q and o projections 2·n·H·h·d each, k and v 2·n·H·g·d each; attention scores and the weighted
    sum 2·2·L²·d per head per sequence (the full L², as the padded SDPA computes it); a dense MLP
    (gate, up, down) 6·n·H·I; a guided MoE: router 2·n·H·(E+1), the always-on shared expert
    6·n·H·I and the routed experts 6·H·I per routed token, n·top_k routed tokens (every expert is a
    copy of the dense MLP, so only the count of routed tokens matters, not which expert gets them;
    the MoE routes padding tokens too). Norms, rotary, softmax and element-wise ops are not counted.
    """
    seqs = [int(padded_to)] * len(lengths) if padded_to is not None else [int(x) for x in lengths]
    n = sum(seqs)
    hid, inter = shape.hidden, shape.intermediate
    qo = 2 * (2 * n * hid * shape.heads * shape.head_dim)
    kv = 2 * (2 * n * hid * shape.kv_heads * shape.head_dim)
    scores = sum(2 * 2 * L * L * shape.head_dim * shape.heads for L in seqs)
    mlp = 6 * n * hid * inter
    out = {"attn_proj": 0, "attn_scores": 0, "mlp": 0, "router": 0, "shared_expert": 0, "routed_experts": 0}
    for kind in shape.layer_kinds:
        out["attn_proj"] += qo + kv
        out["attn_scores"] += scores
        if kind == "moe":
            out["router"] += 2 * n * hid * (shape.experts + 1)
            out["shared_expert"] += mlp
            out["routed_experts"] += 6 * hid * inter * n * shape.top_k
        else:
            out["mlp"] += mlp
    out["linear"] = sum(v for k, v in out.items() if k != "attn_scores")
    out["total"] = out["linear"] + out["attn_scores"]
    out["tokens"] = n
    return out


def flops_of_forwards(shape: LMShape, forwards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Useful (unpadded) and computed LM FLOPs summed over the recorded forwards (computed = padded,
    or = useful for a forward that ran packed, ``MoonConfig.packed``)."""
    useful: dict[str, int] = defaultdict(int)
    computed: dict[str, int] = defaultdict(int)
    for f in forwards:
        for k, v in lm_flops(shape, f["lengths"]).items():
            useful[k] += v
        padded_to = None if f.get("packed") else f["padded_len"]
        for k, v in lm_flops(shape, f["lengths"], padded_to=padded_to).items():
            computed[k] += v
    real, padded = useful.get("tokens", 0), computed.get("tokens", 0)
    return {
        "useful": dict(useful),
        "computed_padded": dict(computed),
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_fraction_tokens": 1 - real / padded if padded else 0.0,
        "padding_fraction_flops": 1 - useful.get("total", 0) / computed["total"] if computed.get("total") else 0.0,
    }


# --------------------------------------------------------------------------- instruments


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in ("hidden_states", "inputs_embeds"):  # decoder layers' self_attn; the LM (called by the graft)
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    return None


def _output_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "last_hidden_state", None), torch.Tensor):  # a transformers ModelOutput
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class Recorder:
    """Time spans from forward pre/post hooks and gradient hooks; records only while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.forwards: list[dict[str, Any]] = []  # per embedder forward: token counts
        self.encoded_images = 0
        self.handles: list[Any] = []
        self._open: dict[Any, float] = {}
        self._seq = 0

    def reset(self) -> None:
        self.spans = defaultdict(list)
        self.forwards = []
        self.encoded_images = 0
        self._open = {}

    def seconds(self, name: str) -> float:
        return sum(t1 - t0 for t0, t1 in self.spans.get(name, ()))

    def watch(self, module: torch.nn.Module, name: str, *, backward: bool = False, on_pre: Callable | None = None):
        def pre(_mod, args, kwargs):
            if self.on:
                if on_pre is not None:
                    on_pre(args, kwargs)
                self._open[name] = time.perf_counter()

        def post(_mod, args, kwargs, out):
            if not self.on:
                return
            t1 = time.perf_counter()
            t0 = self._open.pop(name, None)
            if t0 is None:
                return
            self.spans[name].append((t0, t1))
            if backward and torch.is_grad_enabled():
                self._watch_backward(name, _input_tensor(args, kwargs), _output_tensor(out))

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def watch_backward_node(self, module: torch.nn.Module, name: str) -> None:
        """Time the autograd node that made ``module``'s output (its pre- and post-hooks): for the token
        embedding, ``EmbeddingBackward`` — the dense gradient of the whole table."""

        def post(_mod, _args, out):
            node = getattr(out, "grad_fn", None)
            if not self.on or node is None or not torch.is_grad_enabled():
                return
            self._seq += 1
            key, token = f"bwd:{name}", self._seq

            def started(_grad_outputs):
                if self.on:
                    self._open[(key, token)] = time.perf_counter()

            def done(_grad_inputs, _grad_outputs):
                t1 = time.perf_counter()
                t0 = self._open.pop((key, token), None)
                if self.on and t0 is not None:
                    self.spans[key].append((t0, t1))

            node.register_prehook(started)
            node.register_hook(done)

        self.handles.append(module.register_forward_hook(post))

    def _watch_backward(self, name: str, inp: torch.Tensor | None, out: torch.Tensor | None) -> None:
        """The module's backward runs from its output's gradient arriving to its input's being complete."""
        if inp is None or out is None or not (inp.requires_grad and out.requires_grad):
            return
        self._seq += 1
        key, token = f"bwd:{name}", self._seq

        def started(_grad):
            if self.on:
                self._open[(key, token)] = time.perf_counter()

        def done(_grad):
            t1 = time.perf_counter()
            t0 = self._open.pop((key, token), None)
            if self.on and t0 is not None:
                self.spans[key].append((t0, t1))

        out.register_hook(started)
        inp.register_hook(done)

    def note_batch(self, args, kwargs) -> None:
        """Token counts of one backbone forward (``GraftModel.forward(input_ids, attention_mask, …)``)."""
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[1]
        self.forwards.append(
            {
                "lengths": [int(x) for x in mask.sum(1).tolist()],
                "batch": int(mask.shape[0]),
                "padded_len": int(mask.shape[1]),
                "packed": bool(kwargs.get("packed", False)),  # packed: the LM computed the real tokens only
            }
        )

    def note_images(self, args, kwargs) -> None:
        pixels = args[0] if args else next(iter(kwargs.values()))
        self.encoded_images += int(pixels.shape[0])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class Layout:
    n_layers: int
    mlp_kind: list[str]  # "MoE" / "MLP" per layer

    def block_rows(self) -> list[str]:
        return [f"L{i}.{part}" for i in range(self.n_layers) for part in ("self_attn", "mlp")]

    def label(self, key: str) -> str:
        if key in LABELS:
            return LABELS[key]
        if key.startswith("bwd:"):
            return "backward " + self.label(key[4:])
        if key.startswith("L") and "." in key:
            i, part = key[1:].split(".", 1)
            return f"LM block {i} " + ("self-attention" if part == "self_attn" else self.mlp_kind[int(i)])
        return LABELS[key]


def instrument(emb, rec: Recorder) -> Layout:
    from moon.model.backbone import base_model
    from moon.model.moe import GuidedMoE

    if emb.family.name != "graft":
        raise SystemExit(
            f"{emb.name}: a {emb.family.name} backbone; this profile covers the graft family (moon-smol …)"
        )
    graft = base_model(emb.backbone)
    lm = emb.family.text_model(emb.backbone)
    rec.watch(emb, "model")  # fires in training only: encode_products calls self.forward directly
    rec.watch(graft, "backbone", on_pre=rec.note_batch)
    rec.watch(graft.projector, "projector")
    rec.watch(lm, "lm", backward=True)
    rec.watch_backward_node(lm.get_input_embeddings(), "embed_tokens")
    rec.watch(graft.vision, "image_encoder", on_pre=rec.note_images)
    kinds = []
    for i, layer in enumerate(lm.layers):
        rec.watch(layer.self_attn, f"L{i}.self_attn", backward=True)
        rec.watch(layer.mlp, f"L{i}.mlp", backward=True)
        kinds.append("MoE" if isinstance(layer.mlp, GuidedMoE) else "MLP")
    return Layout(len(lm.layers), kinds)


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One measured run of a part: its total, its rows (seconds, summing to the total) and details."""

    total: float
    rows: dict[str, float]
    forwards: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)


def _routing(emb) -> dict[str, list[int]]:
    """Top-1 routed real tokens per aspect expert, per MoE layer, since the last reset (then reset)."""
    return {str(layer): [int(x) for x in s["counts"].sum(0)] for layer, s in emb.routing_stats(reset=True).items()}


def forward_rows(rec: Recorder, layout: Layout, *, head: bool) -> dict[str, float]:
    """The rows inside the embedder's forward (nested hook spans; derived rows are differences).
    ``head``: the embedder's own forward was hooked (training; ``encode_products`` calls
    ``self.forward`` directly, so there the pooling head is part of "other")."""
    blocks = {k: rec.seconds(k) for k in layout.block_rows()}
    backbone, lm, proj = (rec.seconds(k) for k in ("backbone", "lm", "projector"))
    rows = {"projector": proj, **blocks, "lm_rest": lm - sum(blocks.values()), "graft_glue": backbone - lm - proj}
    if head:
        rows["head"] = rec.seconds("model") - backbone
    return rows


def _finish(rows: dict[str, float], total: float, notes: list[str]) -> dict[str, float]:
    """Clamp derived rows at 0 (moving any deficit into "other") and add other = total − Σ rows."""
    for key in ("input_building", "backward_rest", "bwd:lm_rest", "lm_rest", "graft_glue", "head"):
        if key in rows and rows[key] < 0:
            notes.append(f"{key} came out {rows[key]:.6f} s (< 0, noise of separately measured parts); shown as 0")
            rows[key] = 0.0
    rows["other"] = total - sum(rows.values())
    if rows["other"] < 0:
        notes.append(f"other (Python overhead) is negative: {rows['other']:.6f} s")
    return rows


@dataclass
class Separate:
    """Decode / preprocess / collate measured on their own, once, on the same records."""

    images: int
    decode: float
    preprocess: float
    collate_per_batch: list[float]


def encode_batches(n: int, batch: int) -> list[tuple[bool, list[int]]]:
    """Per forward of ``encode_products(n records, batch_size=batch)``: (first batch of its window?,
    positions in the records). ``MoonEmbedder._encode`` builds the inputs of a window of
    ``16 × batch`` records, length-sorts them, then collates and embeds them batch by batch, so the
    input building lies in the gap before each window's first forward (checked against the image
    encoder's spans; :func:`measure_separately` replays the length sort to collate the same batches)."""
    out = []
    window = batch * ENCODE_WINDOW_BATCHES
    for start in range(0, n, window):
        for b in range(0, min(window, n - start), batch):
            out.append((b == 0, list(range(start + b, min(start + b + batch, n)))))
    return out


def measure_separately(emb, products: Sequence, batch: int) -> Separate:
    from moon.data import load_image
    from moon.model.backbone import base_model

    encoder = base_model(emb.backbone).vision
    refs, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in products:
            for r in emb.inputs.image_refs(p.images, p.crops, emb.config.use_crops, p.id)[0]:
                if str(r) not in seen:
                    seen.add(str(r))
                    refs.append(r)
        items = emb.build_product_inputs(products)
    decode = pre = 0.0
    for r in refs:
        t0 = time.perf_counter()
        img = load_image(r)
        t1 = time.perf_counter()
        encoder.preprocess(img)
        t2 = time.perf_counter()
        decode += t1 - t0
        pre += t2 - t1
    collate = []
    window = batch * ENCODE_WINDOW_BATCHES
    for start in range(0, len(items), window):
        chunk = items[start : start + window]
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]))
        for b in range(0, len(order), batch):
            group = [chunk[i] for i in order[b : b + batch]]
            t0 = time.perf_counter()
            emb.collate(group)
            collate.append(time.perf_counter() - t0)
    return Separate(len(refs), decode, pre, collate)


def encode_run(emb, products: Sequence, batch: int, rec: Recorder, layout: Layout, sep: Separate, *, cold: bool) -> Run:
    from moon.model.graft import FEATURE_CACHE

    if cold:
        FEATURE_CACHE.entries.clear()
    _routing(emb)
    rec.reset()
    rec.on = True
    try:
        with record_function(f"profile::encode_{'cold' if cold else 'warm'}"):
            t0 = time.perf_counter()
            emb.encode_products(products, batch_size=batch)
            t1 = time.perf_counter()
    finally:
        rec.on = False
    total = t1 - t0
    notes: list[str] = []
    fwd = rec.spans["backbone"]
    plan = encode_batches(len(products), batch)
    gaps = [fwd[0][0] - t0] + [fwd[i][0] - fwd[i - 1][1] for i in range(1, len(fwd))]
    sizes_ok = len(fwd) == len(plan) == len(sep.collate_per_batch) and [f["batch"] for f in rec.forwards] == [
        len(idx) for _, idx in plan
    ]
    enc_spans = rec.spans.get("image_encoder", [])
    if sizes_ok:
        first = [i for i, (is_first, _) in enumerate(plan) if is_first]
        windows = [(fwd[i - 1][1] if i else t0, fwd[i][0]) for i in first]
        inside = all(any(a <= s and e <= b for a, b in windows) for s, e in enc_spans)
        build_gaps = sum(gaps[i] - sep.collate_per_batch[i] for i in first)
    else:
        inside = False
    if not (sizes_ok and inside):
        notes.append("forwards do not match encode_products' windows: every gap counted as input building")
        build_gaps = sum(gaps) - sum(sep.collate_per_batch[: len(fwd)])
    share = rec.encoded_images / sep.images if sep.images else 0.0  # warm: 0, cold: 1
    rows = {
        "decode": sep.decode * share,
        "preprocess": sep.preprocess * share,
        "image_encoder": rec.seconds("image_encoder"),
    }
    rows["input_building"] = build_gaps - sum(rows.values())
    rows["collate"] = sum(sep.collate_per_batch[: len(fwd)])
    rows.update(forward_rows(rec, layout, head=False))
    rows = _finish(rows, total, notes)
    details = {
        "images_encoded": rec.encoded_images,
        "images_unique": sep.images,
        "forwards": len(fwd),
        "window_attribution": bool(sizes_ok and inside),
        "routed_top1_tokens_per_expert": _routing(emb),
        "notes": notes,
    }
    return Run(total, rows, list(rec.forwards), details)


@dataclass
class TrainSetup:
    queries: list
    products: list
    loss: Any
    optimizer: Any
    scheduler: Any
    params: list
    autocast: Callable[[], Any]
    aux_weight: float = 1.0  # moon.train.config.LossConfig.aux_weight
    grad_clip: float = 1.0  # moon.train.config.OptimConfig.grad_clip


def make_train_setup(emb, queries: list, products: list, bf16: bool, lr: float, projector_scale: float) -> TrainSetup:
    from moon.train.config import OptimConfig
    from moon.train.losses import ContrastiveLoss
    from moon.train.optim import build_optimizer, build_scheduler

    optim = OptimConfig(lr=lr, lr_scale={"projector": projector_scale}, steps=1000)
    named = [(n, p) for n, p in emb.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, optim)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    return TrainSetup(
        queries=queries,
        products=products,
        loss=ContrastiveLoss(0.05),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, optim),
        params=[p for _, p in named],
        autocast=autocast,
        grad_clip=float(optim.grad_clip or 1.0),
    )


def train_run(emb, setup: TrainSetup, rec: Recorder, layout: Layout) -> Run:
    """One step as ``moon.train.loop`` takes it (ContrastiveStep with in-batch negatives only)."""
    from moon.train.chunked import forward_backward

    n = len(setup.queries)
    allowed = torch.ones(n, n, dtype=torch.bool)
    positive = torch.arange(n)
    marks: dict[str, float] = {}

    def loss_fn(q: torch.Tensor, p: torch.Tensor):
        marks["loss0"] = time.perf_counter()
        with record_function("profile::loss"):
            per_query = setup.loss(q, p, allowed, positive)
            total = per_query.sum()
            out = total / n, {"local_sum": float(total.detach())}
        marks["loss1"] = time.perf_counter()
        return out

    emb.train()
    _routing(emb)
    rec.reset()
    rec.on = True
    try:
        with record_function("profile::train_step"):
            t0 = time.perf_counter()
            setup.optimizer.zero_grad(set_to_none=True)
            t_zg = time.perf_counter()
            with record_function("profile::build_inputs"), warnings.catch_warnings(record=True):
                warnings.simplefilter("always")  # as ContrastiveStep: per-record warnings are recorded, counted
                q_items = emb.build_query_inputs(setup.queries)
                p_items = emb.build_product_inputs(setup.products)
            t_fb0 = time.perf_counter()
            with record_function("profile::forward_backward"):
                _, _, stats = forward_backward(
                    emb,
                    q_items,
                    p_items,
                    loss_fn,
                    chunk_size=None,
                    aux_weight=setup.aux_weight,
                    autocast=setup.autocast,
                )
            t_fb1 = time.perf_counter()
            with record_function("profile::grad_clip"):
                grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.params, setup.grad_clip))
            t_clip = time.perf_counter()
            with record_function("profile::optimizer_step"):
                setup.optimizer.step()
                setup.scheduler.step()
            t1 = time.perf_counter()
    finally:
        rec.on = False
        emb.eval()
    total = t1 - t0
    notes: list[str] = []
    fwd = rec.spans["model"]
    if len(fwd) != 2:
        raise RuntimeError(f"expected 2 embedder forwards (queries, products) in a step, saw {len(fwd)}")
    rows = {"decode": 0.0, "preprocess": 0.0, "image_encoder": rec.seconds("image_encoder")}
    if rec.encoded_images:
        notes.append(f"{rec.encoded_images} images were encoded in this step (cold feature cache)")
    rows["input_building"] = (t_fb0 - t_zg) - rows["image_encoder"]
    rows["collate"] = (fwd[0][0] - t_fb0) + (fwd[1][0] - fwd[0][1])
    rows.update(forward_rows(rec, layout, head=True))
    rows["loss"] = marks["loss1"] - marks["loss0"]
    backward = t_fb1 - marks["loss1"]
    bwd = {f"bwd:{k}": rec.seconds(f"bwd:{k}") for k in layout.block_rows()}
    rows.update(bwd)
    bwd_lm = rec.seconds("bwd:lm")
    rows["bwd:lm_rest"] = bwd_lm - sum(bwd.values())
    rows["bwd:embed_tokens"] = rec.seconds("bwd:embed_tokens")
    rows["backward_rest"] = backward - bwd_lm - rows["bwd:embed_tokens"]
    rows["grad_clip"] = t_clip - t_fb1
    rows["optimizer"] = (t_zg - t0) + (t1 - t_clip)
    rows = _finish(rows, total, notes)
    spans = sorted(s for k in [*bwd, "bwd:embed_tokens"] for s in rec.spans.get(k, ()))
    overlap = any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    if overlap:
        notes.append("backward spans of different modules overlap: the per-block backward split is approximate")
    details = {
        "backward_seconds": backward,
        "backward_lm_seconds": bwd_lm,
        "backward_spans": {k: len(rec.spans.get(k, ())) for k in [*bwd, "bwd:lm", "bwd:embed_tokens"]},
        "backward_spans_overlap": overlap,
        "loss": float(stats["local_sum"]) / n,
        "aux": float(stats["aux"]),
        "grad_norm": grad_norm,
        "images_encoded": rec.encoded_images,
        "routed_top1_tokens_per_expert": _routing(emb),
        "notes": notes,
    }
    return Run(total, rows, list(rec.forwards), details)


# --------------------------------------------------------------------------- summaries


def summarise(runs: list[Run], shape: LMShape, layout: Layout, peak: dict[str, Any], precision: str) -> dict[str, Any]:
    """The median run's rows (by total), every run's total, per-row medians and the FLOP/s lines."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].total)
    mid = runs[order[(len(runs) - 1) // 2]]
    total = mid.total
    rows = [
        {
            "key": k,
            "label": layout.label(k) if k != "other" or "head" in mid.rows else LABELS["other_encode"],
            "seconds": v,
            "percent": 100 * v / total if total > 0 else 0.0,
            "how": HOW.get(k, "grad hooks" if k.startswith("bwd:") else "hook"),
        }
        for k, v in mid.rows.items()
    ]
    blocks_fwd = sum(mid.rows[k] for k in layout.block_rows())
    flops = flops_of_forwards(shape, mid.forwards)
    peak_gflops = peak[precision]["best_gflops"]
    fwd = {
        "lm_block_seconds": blocks_fwd,
        "useful_gflop": flops["useful"]["total"] / 1e9,
        "computed_gflop": flops["computed_padded"]["total"] / 1e9,
        "useful_gflops_per_s": flops["useful"]["total"] / blocks_fwd / 1e9 if blocks_fwd > 0 else None,
        "computed_gflops_per_s": flops["computed_padded"]["total"] / blocks_fwd / 1e9 if blocks_fwd > 0 else None,
    }
    fwd["percent_of_peak_computed"] = (
        100 * fwd["computed_gflops_per_s"] / peak_gflops if fwd["computed_gflops_per_s"] else None
    )
    out: dict[str, Any] = {
        "total_seconds": total,
        "rows": rows,
        "run_totals": [r.total for r in runs],
        "median_run": order[(len(runs) - 1) // 2],
        "row_medians": {k: statistics.median(r.rows.get(k, 0.0) for r in runs) for k in mid.rows},
        "forwards": mid.forwards,
        "flops": flops,
        "lm_forward": fwd,
        "details": mid.details,
    }
    bwd_keys = [f"bwd:{k}" for k in layout.block_rows()]
    if all(k in mid.rows for k in bwd_keys):
        secs = sum(mid.rows[k] for k in bwd_keys)
        est = 2 * flops["computed_padded"]["total"]
        out["lm_backward"] = {
            "lm_block_seconds": secs,
            "computed_gflop_estimate": est / 1e9,
            "computed_gflops_per_s_estimate": est / secs / 1e9 if secs > 0 else None,
            "how": "2 × the forward's computed (padded) FLOPs, the usual estimate for linear layers",
        }
    return out


def _fmt_s(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    prec = report["precision"]
    cfg = report["config"]
    yes = {True: "yes", False: "no"}
    load = report["load_1min"]
    machine_line = (
        f"machine: {m['cpu_model']} · avx2 {yes[m['avx2']]} · avx512f {yes[m['avx512f']]} · "
        f"avx512_bf16 {yes[m['avx512_bf16']]} · amx {yes[m['amx']]} · {m['torch_threads']} torch threads "
        f"({m['cpu_count']} CPUs) · torch {m['torch']} · transformers {m['transformers']} · "
        f"1-min load average {load['start']} at start, {load['end']} at end"
    )
    lines = [
        f"# Profile of {cfg['preset']} — {report['tag']}",
        "",
        f"precision: **{prec['resolved']}** (requested `{prec['requested']}`; "
        f"`moon.precision.resolve_bf16({prec['requested']!r}, 'cpu')` = {prec['bf16']}); "
        f"world: {cfg['products']} products (seed {cfg['seed']}), truth-box crops; "
        f"encode batch {cfg['batch']}; train batch {cfg['train_batch']} queries + their products; "
        f"median of {cfg['repeats']} run(s) after 1 warm-up.",
        "",
        machine_line,
        "",
    ]
    peak = report["matmul_peak"]
    peak_line = "; ".join(
        f"{dt} " + ", ".join(f"{n}² {v['gflops_median']:.1f}" for n, v in per.items() if n.isdigit())
        for dt, per in peak.items()
    )
    titles = {
        "encode_cold": f"Encode {cfg['products']} products, cold image-feature cache",
        "encode_warm": f"Encode {cfg['products']} products, warm image-feature cache",
        "train_step": f"One training step ({cfg['train_batch']} queries + {cfg['train_batch']} products)",
    }
    for key, part in report["parts"].items():
        lines += [f"## {titles[key]}: {_fmt_s(part['total_seconds'])} s", ""]
        lines += ["| row | seconds | % | measured by |", "|---|---:|---:|---|"]
        for r in sorted(part["rows"], key=lambda r: -r["seconds"]):
            lines.append(f"| {r['label']} | {_fmt_s(r['seconds'])} | {r['percent']:.1f} | {r['how']} |")
        lines.append(f"| **total** | **{_fmt_s(part['total_seconds'])}** | 100.0 | perf_counter |")
        fl, f = part["flops"], part["lm_forward"]
        lines.append("")
        if f["useful_gflops_per_s"] is not None:
            lines.append(
                f"LM FLOP/s (forward): {f['useful_gflop']:.3f} GFLOP counted on {fl['real_tokens']} real tokens in "
                f"{_fmt_s(f['lm_block_seconds'])} s of LM block rows = **{f['useful_gflops_per_s']:.1f} GFLOP/s useful**; "
                f"the padded batches compute {f['computed_gflop']:.3f} GFLOP ({fl['padded_tokens']} tokens, "
                f"padding {100 * fl['padding_fraction_tokens']:.1f} % of tokens / {100 * fl['padding_fraction_flops']:.1f} % "
                f"of FLOPs) = {f['computed_gflops_per_s']:.1f} GFLOP/s = {f['percent_of_peak_computed']:.1f} % of the "
                f"{prec['resolved']} matmul peak ({peak[prec['resolved']]['best_gflops']:.1f} GFLOP/s)."
            )
        b = part.get("lm_backward")
        if b and b["computed_gflops_per_s_estimate"] is not None:
            lines.append(
                f"LM FLOP/s (backward, estimate): ≈{b['computed_gflop_estimate']:.3f} GFLOP (2 × forward) in "
                f"{_fmt_s(b['lm_block_seconds'])} s of backward block rows ≈ {b['computed_gflops_per_s_estimate']:.1f} GFLOP/s."
            )
        for note in part["details"].get("notes", []):
            lines.append(f"note: {note}")
        lines.append("")
    lines += [
        f"matmul peak (median GFLOP/s of torch.matmul, square, {m['torch_threads']} threads): {peak_line}.",
        "",
        machine_line,
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset", default=None, help="MoonEmbedder preset of the graft family [moon-smol; --quick: moon-graft-tiny]"
    )
    ap.add_argument(
        "--products", type=int, default=None, help="products to encode (also the world's size) [200; --quick: 8]"
    )
    ap.add_argument("--batch", type=int, default=16, help="encode_products batch size [16]")
    ap.add_argument("--train-batch", type=int, default=None, help="queries in the training step [17; --quick: 4]")
    ap.add_argument("--repeats", type=int, default=None, help="measured runs per part, after 1 warm-up [3; --quick: 1]")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="[auto]")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0, help="world seed and query sampling [0]")
    ap.add_argument("--out", default="profile-out", help="where the world and its crops are cached [profile-out/]")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR), help="where profile-<tag>.{json,md} go")
    ap.add_argument("--tag", default=None, help="file name tag [today's date]")
    ap.add_argument(
        "--peak-repeats", type=int, default=None, help="timed matmuls per size for the peak [5; --quick: 2]"
    )
    ap.add_argument("--trace", action="store_true", help="also export a Chrome trace of one extra training step")
    ap.add_argument("--quick", action="store_true", help="smoke run: moon-graft-tiny, 8 products, 1 repeat")
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = {"preset": ("moon-smol", "moon-graft-tiny"), "products": (200, 8), "train_batch": (17, 4),
                "repeats": (3, 1), "peak_repeats": (5, 2), "tag": (_dt.date.today().isoformat(),) * 2}  # fmt: skip
    for name, pair in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, pair[int(quick)])
    for name in ("products", "batch", "train_batch", "repeats", "peak_repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_embedder(preset: str, precision: str):
    from moon.model import MoonEmbedder

    return MoonEmbedder.from_pretrained(preset, device="cpu", precision=precision)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from moon.model.graft import FEATURE_CACHE
    from moon.precision import resolve_bf16

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_1min()
    bf16 = resolve_bf16(args.precision, "cpu")
    resolved = "bf16" if bf16 else "fp32"
    machine = machine_facts()

    out = Path(args.out)
    store = open_world(out, args.products, args.seed)
    crops = truth_crops(store, out / f"crops-{args.products}-s{args.seed}")
    products = [with_crops(p, crops) for p in store.products()[: args.products]]
    queries, bought = pick_train_batch(store, crops, args.train_batch, args.seed)

    emb = build_embedder(args.preset, args.precision)
    rec = Recorder()
    layout = instrument(emb, rec)
    shape = LMShape.of(emb)
    params = sum(p.numel() for p in emb.parameters())
    trainable = sum(p.numel() for p in emb.parameters() if p.requires_grad)

    # encode: a warm-up (one batch, then the cache emptied again), cold runs, warm runs
    emb.encode_products(products[: args.batch], batch_size=args.batch)
    FEATURE_CACHE.entries.clear()
    sep = measure_separately(emb, products, args.batch)  # also fills the feature cache; the cold runs empty it
    cold = [encode_run(emb, products, args.batch, rec, layout, sep, cold=True) for _ in range(args.repeats)]
    warm = [encode_run(emb, products, args.batch, rec, layout, sep, cold=False) for _ in range(args.repeats)]

    # train: a warm-up step (fills the cache with the batch's images), then the measured steps
    setup = make_train_setup(emb, queries, bought, bf16, lr=1e-4, projector_scale=10.0)
    train_run(emb, setup, rec, layout)
    train = [train_run(emb, setup, rec, layout) for _ in range(args.repeats)]

    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            train_run(emb, setup, rec, layout)
        trace_path = Path(args.results_dir) / f"profile-{args.tag}-train-trace.json"
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    rec.close()

    sizes = (1024, 2048)
    peak = matmul_peak(sizes, ("fp32", "bf16") if bf16 else ("fp32",), args.peak_repeats)
    parts = {
        "encode_cold": summarise(cold, shape, layout, peak, resolved),
        "encode_warm": summarise(warm, shape, layout, peak, resolved),
        "train_step": summarise(train, shape, layout, peak, resolved),
    }
    report: dict[str, Any] = {
        "script": "benchmarks/profile_encode_train.py",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "tag": args.tag,
        "date": _dt.date.today().isoformat(),
        "config": {
            "preset": args.preset,
            "products": args.products,
            "batch": args.batch,
            "train_batch": len(queries),
            "train_batch_requested": args.train_batch,
            "train_query_modalities": {m: sum(q.modality == m for q in queries) for m in MODALITY_MIX},
            "repeats": args.repeats,
            "seed": args.seed,
            "quick": args.quick,
            "world": str(store.root),
            "images_with_crops": sum(c is not None for c in crops.values()),
            "optimizer": "AdamW via moon.train.optim.build_optimizer: lr 1e-4, lr_scale {projector: 10}, "
            "weight decay 0.01; grad clip 1.0; loss temperature 0.05; aux weight 1.0; chunk_size None",
        },
        "precision": {
            "requested": args.precision,
            "bf16": bf16,
            "resolved": resolved,
            "how": "MoonConfig.precision for encode_products; torch.autocast(cpu, bf16) around the training "
            "forward when bf16 (the trainer's own run.precision=auto means fp32 on CPU)",
            "image_encoder": "fp32 (FrozenImageFeatures disables autocast)",
        },
        "machine": machine,
        "load_1min": {"start": load_start, "end": load_1min()},
        "model": {
            "name": emb.name,
            "lm_shape": asdict(shape),
            "moe_layers": emb.moe_layer_ids,
            "parameters": params,
            "trainable_parameters": trainable,
        },
        "separately_measured": {
            "images": sep.images,
            "decode_seconds": sep.decode,
            "preprocess_seconds": sep.preprocess,
            "collate_seconds_per_batch": sep.collate_per_batch,
        },
        "matmul_peak": peak,
        "parts": parts,
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"profile-{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = markdown(report)
    (results / f"profile-{args.tag}.md").write_text(md, encoding="utf-8")
    print(md)
    return report


if __name__ == "__main__":
    main()
