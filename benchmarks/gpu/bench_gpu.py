"""MOON on one GPU: training step, embedding and MoE overhead, ours vs the plain Hugging Face way.

Run from the repository root (no install needed; nothing is downloaded)::

    PYTHONPATH=src python benchmarks/gpu/bench_gpu.py --out $OUT            # H100/H200
    PYTHONPATH=src python benchmarks/gpu/bench_gpu.py --device cpu --preset moon-tiny --quick --out /tmp/smoke

The model is the ``moon-3b`` preset (Qwen2.5-VL-3B shape, random init, bf16) with the guided MoE in
all decoder layers (``--moe-layers all``) or the last four (``last4``). Batches are synthetic but
shaped like real ones: products with 1-3 images of 336-448 px plus a crop, titles/categories/attributes
of realistic token counts; queries in the paper's image : text : multimodal = 12 : 3 : 2 mix.

Variants (each timed with CUDA events after warm-up; medians of ``--repeats``; an out-of-memory is
recorded as ``"oom"``, never a crash):

Both ways are the library's own forward (``MoonEmbedder``), switched by its runtime config
(``emb.config = emb.config.replace(...)``, read on every forward; :func:`library_path`):

* ``train_hf``: the plain HF way: ``packed=False`` (right-padded batches, SDPA),
  ``moe_dispatch="loop"`` (one matmul per expert), HF gradient checkpointing, the same InfoNCE loss
  and AdamW.
* ``train_ours[...]``: ``packed=True`` (no padding; attention by :mod:`moon.model.packed`'s backend,
  a varlen FlashAttention kernel on CUDA where one passes its check, else one SDPA call per distinct
  sequence length; ``--attention`` picks it), ``moe_dispatch="auto"`` (a grouped GEMM over
  expert-sorted tokens where ``grouped_mm`` works), fused AdamW, GradCache chunks and/or gradient
  checkpointing as named.
* ``train_ours_dense``: the best ``train_ours`` configuration with every MoE layer replaced by its
  shared (original dense) MLP: the MoE overhead is ``train_ours / train_ours_dense``.
* ``embed_naive`` / ``embed_ours``: no-grad product embedding, the plain way vs the fast way.

The vision tower is transformers' own in both ways.

FLOPs are counted from the architecture (see :func:`count_flops` and NOTES.md); MFU is counted
FLOPs per second over the bf16 matrix peak measured in the same run. A ``--device cpu`` run is a
smoke run of the code paths: its JSON says ``"smoke_run": true`` and its numbers are not GPU numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moon.model import packed
from moon.model.backbone import base_model, build_backbone, language_model, preset_backbone_config
from moon.model.config import ASPECTS, EXPERTS, PRESETS, MoonConfig
from moon.model.embedder import MoonEmbedder
from moon.model.inputs import EncodedInput
from moon.model.moe import GuidedMoE, grouped_mm_works, moe_layers
from moon.train.chunked import forward_backward
from moon.train.losses import ContrastiveLoss

ASPECT_ID = {name: i for i, name in enumerate(ASPECTS)}
IMAGE_PAD, VISION_START, VISION_END, END, PAD = 151655, 151652, 151653, 151645, 151643
TEXT_VOCAB = 151643  # ordinary BPE ids are below the specials
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM datasheets


# ---------------------------------------------------------------------------------------------
# Synthetic, realistically shaped batches
# ---------------------------------------------------------------------------------------------
@dataclass
class Shapes:
    """Sizes of the synthetic records (pixels are image sides, multiples of 28)."""

    product_sides: tuple[tuple[int, int], ...] = ((448, 448), (448, 336), (336, 448), (392, 392))
    max_product_images: int = 3
    crop_side: int = 224
    query_side: tuple[int, int] = (448, 448)
    title_tokens: tuple[int, int] = (15, 45)
    category_tokens: tuple[int, int] = (6, 14)
    attribute_tokens: tuple[int, int] = (10, 40)
    query_text_tokens: tuple[int, int] = (4, 16)
    instruction_tokens: int = 8

    @classmethod
    def tiny(cls) -> Shapes:
        return cls(
            product_sides=((112, 112), (84, 112), (56, 56)),
            max_product_images=2,
            crop_side=56,
            query_side=(112, 84),
            title_tokens=(4, 12),
            category_tokens=(2, 4),
            attribute_tokens=(2, 6),
            query_text_tokens=(2, 6),
            instruction_tokens=4,
        )


class _Builder:
    def __init__(self, gen: torch.Generator):
        self.gen = gen
        self.ids: list[int] = []
        self.tags: list[int] = []
        self.pixels: list[torch.Tensor] = []
        self.grids: list[list[int]] = []
        self.aspects: list[str] = []

    def randint(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def text(self, n: int, aspect: str) -> None:
        self.ids += torch.randint(0, TEXT_VOCAB, (n,), generator=self.gen).tolist()
        self.tags += [ASPECT_ID[aspect]] * n

    def image(self, height: int, width: int, aspect: str) -> None:
        gh, gw = height // 14, width // 14
        self.pixels.append(torch.randn(gh * gw, PATCH_DIM, generator=self.gen))
        self.grids.append([1, gh, gw])
        self.aspects.append(aspect)
        self.ids += [VISION_START] + [IMAGE_PAD] * (gh * gw // 4) + [VISION_END]
        self.tags += [ASPECT_ID["template"]] + [ASPECT_ID[aspect]] * (gh * gw // 4) + [ASPECT_ID["template"]]

    def done(self, record_id: str) -> EncodedInput:
        self.ids.append(END)
        self.tags.append(ASPECT_ID["template"])
        return EncodedInput(
            input_ids=torch.tensor(self.ids),
            aspect_ids=torch.tensor(self.tags),
            pixel_values=torch.cat(self.pixels) if self.pixels else None,
            image_grid_thw=torch.tensor(self.grids) if self.grids else None,
            image_aspects=self.aspects,
            record_id=record_id,
        )


def synthetic_products(n: int, shapes: Shapes, seed: int = 0) -> list[EncodedInput]:
    """``n`` product inputs laid out exactly as :class:`moon.model.inputs.InputBuilder` lays them out."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = _Builder(gen)
        b.text(shapes.instruction_tokens, "template")
        for k in range(b.randint(1, shapes.max_product_images)):
            h, w = shapes.product_sides[b.randint(0, len(shapes.product_sides) - 1)]
            b.image(h, w, "vision")
            if k == 0:
                b.image(shapes.crop_side, shapes.crop_side, "crop")
        b.text(2, "template")
        b.text(b.randint(*shapes.title_tokens), "title")
        b.text(3, "template")
        b.text(b.randint(*shapes.category_tokens), "category")
        b.text(3, "template")
        b.text(b.randint(*shapes.attribute_tokens), "attribute")
        out.append(b.done(f"p{i}"))
    return out


def synthetic_queries(n: int, shapes: Shapes, seed: int = 1) -> list[EncodedInput]:
    """``n`` queries, image : text : multimodal = 12 : 3 : 2 (the paper's mix), cycled."""
    gen = torch.Generator().manual_seed(seed)
    mix = ["image"] * 12 + ["text"] * 3 + ["multimodal"] * 2
    out = []
    for i in range(n):
        kind = mix[i % len(mix)]
        b = _Builder(gen)
        b.text(shapes.instruction_tokens, "template")
        if kind in ("image", "multimodal"):
            b.image(*shapes.query_side, "vision")
            b.image(shapes.crop_side, shapes.crop_side, "crop")
        if kind in ("text", "multimodal"):
            b.text(b.randint(*shapes.query_text_tokens), "query_text")
        out.append(b.done(f"q{i}"))
    return out


# ---------------------------------------------------------------------------------------------
# FLOP counting from the architecture
# ---------------------------------------------------------------------------------------------
def _vision_windows(gh: int, gw: int, window_patches: int, merge: int) -> list[int]:
    """Patch counts of the attention windows of one image (``window_patches`` per side)."""
    units = window_patches // merge
    hm, wm = gh // merge, gw // merge
    rows = [min(units, hm - r) for r in range(0, hm, units)]
    cols = [min(units, wm - c) for c in range(0, wm, units)]
    return [r * c * merge * merge for r in rows for c in cols]


def count_flops(bcfg: Any, items: Sequence[EncodedInput], moe_layer_ids: Sequence[int], top_k: int) -> dict[str, float]:
    """Forward FLOPs (multiply-add = 2) of embedding ``items``, split into parts.

    Counted: every matrix product with weights (vision patch embedding, blocks, merger; decoder
    attention projections, dense/shared MLP, the ``top_k`` routed experts, the router) and the
    attention score/value products (windowed and full in the vision tower, causal in the decoder:
    half the square). Not counted: norms, rotary, softmax, activations, pooling, the loss.

    Returns ``{"vision", "llm_dense", "llm_experts", "attention", "total", "llm_tokens", "patches"}``.
    """
    v, t = bcfg.vision_config, bcfg.get_text_config()
    hv, iv, merge = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    win = v.window_size // v.patch_size
    h, inter, kv = t.hidden_size, t.intermediate_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    n_layers = t.num_hidden_layers
    full = set(v.fullatt_block_indexes)
    vision = llm_dense = llm_experts = attention = 0.0
    patches = tokens = 0
    per_block = 2 * (4 * hv * hv + 3 * hv * iv)
    for item in items:
        if item.image_grid_thw is not None:
            for t_, gh, gw in item.image_grid_thw.tolist():
                p = t_ * gh * gw
                patches += p
                vision += 2 * p * PATCH_DIM * hv + v.depth * p * per_block
                vision += 2 * (p // merge**2) * (4 * hv * 4 * hv + 4 * hv * h)
                windows = _vision_windows(gh, gw, win, merge)
                for layer in range(v.depth):
                    sizes = [p] if layer in full else windows
                    attention += sum(4 * s * s * hv for s in sizes)
        n = len(item)
        tokens += n
        llm_dense += 2 * n * n_layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
        llm_experts += 2 * n * len(moe_layer_ids) * (top_k * 3 * h * inter + h * (len(EXPERTS) + 1))
        attention += n_layers * 2 * n * n * h
    total = vision + llm_dense + llm_experts + attention
    return {
        "vision": vision,
        "llm_dense": llm_dense,
        "llm_experts": llm_experts,
        "attention": attention,
        "total": total,
        "llm_tokens": float(tokens),
        "patches": float(patches),
    }


def train_flops(fwd: dict[str, float], experts_trainable: bool) -> float:
    """Model FLOPs of one training step: forward + input gradients + weight gradients (3× forward),
    minus the weight gradients of frozen experts. Recomputation (checkpointing, GradCache) is not
    counted: this is MFU, not hardware FLOP utilisation."""
    total = 3 * fwd["total"]
    return total if experts_trainable else total - fwd["llm_experts"]


# ---------------------------------------------------------------------------------------------
# The model and the two ways of running it
# ---------------------------------------------------------------------------------------------
class _IdTokenizer:
    """The four ids :class:`InputBuilder` asks for; the benchmark makes token ids itself (no tokenizer
    files needed on the GPU machine)."""

    pad_token_id = PAD
    _ids = {
        "<|vision_start|>": VISION_START,
        "<|vision_end|>": VISION_END,
        "<|image_pad|>": IMAGE_PAD,
        "<|im_end|>": END,
    }

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self._ids[t] for t in tokens]


def build_model(preset: str, moe_layers_opt: str, device: torch.device, dtype: torch.dtype) -> MoonEmbedder:
    """The preset with random weights built directly on ``device`` in ``dtype`` (MoE upcycled)."""
    bcfg = preset_backbone_config(preset)
    n_layers = bcfg.get_text_config().num_hidden_layers
    layers = None if moe_layers_opt == "all" else list(range(n_layers - 4, n_layers))
    config = MoonConfig(backbone=preset, **PRESETS[preset][1]).replace(moe_layers=layers)
    torch.manual_seed(config.seed)  # (build_backbone seeds the CPU generator only)
    with torch.device(device):
        backbone = build_backbone(bcfg, seed=config.seed)
    backbone.to(dtype=dtype)
    emb = MoonEmbedder(config, backbone, _IdTokenizer(), name=preset)
    return emb.to(device=device, dtype=dtype)


@contextlib.contextmanager
def dense_mode(emb: MoonEmbedder) -> Iterator[None]:
    """Temporarily replace every MoE layer by its shared expert (the original dense MLP)."""
    swapped = []
    for layer in language_model(emb.backbone).layers:
        if isinstance(layer.mlp, GuidedMoE):
            swapped.append((layer, layer.mlp))
            layer.mlp = layer.mlp.shared
    try:
        yield
    finally:
        for layer, moe in swapped:
            layer.mlp = moe


@contextlib.contextmanager
def library_path(emb: MoonEmbedder, ours: bool) -> Iterator[None]:
    """Run ``emb`` the library's fast way (``ours``: packed sequences, ``moe_dispatch="auto"``, i.e. a
    grouped GEMM where it works) or its plain way (padded batches, one matmul per expert); the
    embedder reads its config on every forward, so this is a config switch, not a patch."""
    saved = emb.config
    emb.config = saved.replace(packed=ours, moe_dispatch="auto" if ours else "loop")
    try:
        yield
    finally:
        emb.config = saved


class PreCollated:
    """``emb`` for :func:`moon.train.chunked.forward_backward` with each list of items collated once
    (the padded ``train_hf`` batches are built before timing too)."""

    def __init__(self, emb: MoonEmbedder):
        self.emb = emb
        self.batches: dict[tuple[int, ...], dict] = {}

    def collate(self, items: Sequence[EncodedInput]) -> dict:
        key = tuple(id(x) for x in items)
        if key not in self.batches:
            self.batches[key] = self.emb.collate(items)
        return self.batches[key]

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.emb(batch)

    def aux_loss(self) -> torch.Tensor:
        return self.emb.aux_loss()


def in_batch_loss(loss: ContrastiveLoss) -> Callable:
    def fn(q: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        n = q.shape[0]
        allowed = torch.ones(n, p.shape[0], dtype=torch.bool, device=q.device)
        positive = torch.arange(n, device=q.device)
        per_query = loss(q, p, allowed, positive)
        return per_query.mean(), {"local_sum": float(per_query.detach().sum())}

    return fn


def set_checkpointing(emb: MoonEmbedder, on: bool) -> None:
    if on:
        emb.gradient_checkpointing_enable()
        return
    base = base_model(emb.backbone)
    off = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    off()


def set_trainable(emb: MoonEmbedder, mode: str) -> list[torch.nn.Parameter]:
    """``all``: every weight; ``frozen-experts``: all but the aspect experts (the upcycled copies)."""
    for p in emb.parameters():
        p.requires_grad_(True)
    if mode == "frozen-experts":
        for moe in moe_layers(emb.backbone):
            moe.experts.requires_grad_(False)
    return [p for p in emb.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class Timer:
    """Median wall time of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, deadline: float = math.inf):
        self.device = device
        self.deadline = deadline

    def run(self, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
        """Times of ``repeats`` calls after ``warmup`` calls; past the deadline, stops after the first."""
        for _ in range(warmup):
            fn()
        self.sync()
        times: list[float] = []
        for _ in range(repeats):
            if times and time.monotonic() > self.deadline:
                break
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return times

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def measure_bf16_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """TFLOP/s of an ``n³`` bf16 matrix product on random data (median of ``repeats``); CUDA only."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = Timer(device).run(lambda: a @ b, warmup=3, repeats=repeats)
    return 2 * n**3 / median(times) / 1e12


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
@dataclass
class Bench:
    emb: MoonEmbedder
    device: torch.device
    products: list[EncodedInput]
    queries: list[EncodedInput]
    args: argparse.Namespace
    peak_tflops: float | None
    deadline: float
    results: dict[str, Any] = field(default_factory=dict)

    def flops(self, items: Sequence[EncodedInput], dense: bool = False) -> dict[str, float]:
        bcfg = base_model(self.emb.backbone).config
        return count_flops(bcfg, items, [] if dense else self.emb.moe_layer_ids, self.emb.config.moe_top_k)

    def _figures(self, times: list[float], flops: float, n_products: int, n_queries: int, tokens: float) -> dict:
        t = median(times)
        out = {
            "seconds_median": t,
            "seconds_all": times,
            "products_per_s": n_products / t,
            "queries_per_s": n_queries / t,
            "records_per_s": (n_products + n_queries) / t,
            "llm_tokens_per_s": tokens / t,
            "model_tflops": flops / 1e12,
            "achieved_tflops": flops / t / 1e12,
            "mfu": flops / t / 1e12 / self.peak_tflops if self.peak_tflops else None,
        }
        if self.device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out

    def _prepare_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def variant(self, name: str, fn: Callable[[], dict]) -> None:
        """Run one variant, recording OOM/errors/budget skips instead of raising."""
        left = self.deadline - time.monotonic()
        if left < self.args.min_variant_s:
            self.results[name] = {"status": "skipped", "reason": f"time budget: {left:.0f} s left"}
            print(f"[{name}] skipped (budget)", flush=True)
            return
        print(f"[{name}] running ...", flush=True)
        t0 = time.monotonic()
        self._prepare_memory()
        try:
            res = fn()
            res["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one variant must not end the run
            if not is_oom(exc) and self.args.fail_fast:
                raise
            res = {"status": "oom" if is_oom(exc) else "error", "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            if self.device.type == "cuda":
                res["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        finally:
            gc.collect()
            self.emb.zero_grad(set_to_none=True)
            self._prepare_memory()
        res["wall_s"] = time.monotonic() - t0
        self.results[name] = res
        print(f"[{name}] {summary_line(res)}", flush=True)

    # -- training -------------------------------------------------------------------------------
    def train_hf(self) -> dict:
        emb, a = self.emb, self.args
        emb.train()
        params = set_trainable(emb, a.trainable)
        opt = torch.optim.AdamW(params, lr=1e-5)
        set_checkpointing(emb, a.hf_checkpointing)
        loss = ContrastiveLoss(0.05).to(self.device)
        q_batch, p_batch = emb.collate(self.queries), emb.collate(self.products)

        def step() -> None:
            q = emb(q_batch)
            aux_q = emb.aux_loss()
            p = emb(p_batch)
            total, _ = in_batch_loss(loss)(q, p)
            (total + (aux_q + emb.aux_loss()) / 2).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            with library_path(emb, ours=False):
                times = Timer(self.device, self.deadline).run(step, a.warmup, a.repeats)
                if a.profile:
                    self.results["profile_train_hf"] = profile_step(step, self.device, a.out, "train_hf")
        finally:
            set_checkpointing(emb, False)
        f_p, f_q = self.flops(self.products), self.flops(self.queries)
        flops = train_flops(f_p, a.trainable == "all") + train_flops(f_q, a.trainable == "all")
        res = self._figures(times, flops, len(self.products), len(self.queries), f_p["llm_tokens"] + f_q["llm_tokens"])
        res.update(padding_fraction=padding_fraction(self.products, self.queries), checkpointing=a.hf_checkpointing)
        return res

    def train_ours(self, checkpointing: bool, chunk: int | None, dense: bool = False) -> dict:
        emb, a = self.emb, self.args
        emb.train()
        params = set_trainable(emb, a.trainable)
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(params, lr=1e-5, fused=fused)
        set_checkpointing(emb, checkpointing)
        loss = ContrastiveLoss(0.05).to(self.device)
        model = PreCollated(emb)
        aux_weight = 0.0 if dense else emb.config.moe_aux_weight

        def step() -> None:
            forward_backward(
                model, self.queries, self.products, in_batch_loss(loss), chunk_size=chunk, aux_weight=aux_weight
            )
            opt.step()
            opt.zero_grad(set_to_none=True)

        ctx = dense_mode(emb) if dense else contextlib.nullcontext()
        try:
            with ctx, library_path(emb, ours=True):
                times = Timer(self.device, self.deadline).run(step, a.warmup, a.repeats)
                if a.profile and not dense and "profile_train_ours" not in self.results:
                    self.results["profile_train_ours"] = profile_step(step, self.device, a.out, "train_ours")
        finally:
            set_checkpointing(emb, False)
        f_p, f_q = self.flops(self.products, dense), self.flops(self.queries, dense)
        trainable_experts = a.trainable == "all"
        flops = train_flops(f_p, trainable_experts) + train_flops(f_q, trainable_experts)
        res = self._figures(times, flops, len(self.products), len(self.queries), f_p["llm_tokens"] + f_q["llm_tokens"])
        res.update(checkpointing=checkpointing, chunk=chunk, dense=dense)
        return res

    # -- embedding ------------------------------------------------------------------------------
    def embed(self, ours: bool) -> dict:
        emb, a = self.emb, self.args
        emb.eval()
        bs = a.embed_batch
        items = self.products
        batches = [items[i : i + bs] for i in range(0, len(items), bs)]
        prepared = [emb.collate(b) for b in batches]

        def run() -> None:
            with torch.no_grad():
                for b in prepared:
                    emb(b)

        with library_path(emb, ours=ours):
            times = Timer(self.device, self.deadline).run(run, a.warmup, a.repeats)
        f = self.flops(self.products)
        res = self._figures(times, f["total"], len(self.products), 0, f["llm_tokens"])
        res.update(batch=bs)
        return res


def floor_report(
    args: argparse.Namespace, peak_tflops: float = 790.0, bandwidths_tbs: tuple[float, ...] = (3.0, 4.3)
) -> dict:
    """The floor of one training step and one embedding pass at the configured batch, from the
    architecture alone (no weights are allocated): FLOPs, bytes, compute- and memory-bound times."""
    from moon.model.backbone import build_backbone

    bcfg = preset_backbone_config(args.preset)
    t = bcfg.get_text_config()
    dense = build_backbone(bcfg, seed=0, device="meta")
    n_dense = sum(p.numel() for p in dense.parameters())
    n_vision = sum(p.numel() for p in dense.visual.parameters())
    n_embed = dense.get_input_embeddings().weight.numel()
    n_layers = t.num_hidden_layers
    moe_ids = list(range(n_layers)) if args.moe_layers == "all" else list(range(n_layers - 4, n_layers))
    expert = 3 * t.hidden_size * t.intermediate_size
    n_experts = len(moe_ids) * (
        len(EXPERTS) * expert + t.hidden_size * (len(EXPERTS) + 1) + (len(ASPECTS) + 1) * len(EXPERTS)
    )
    n_total = n_dense + n_experts
    n_trainable = n_total if args.trainable == "all" else n_total - len(moe_ids) * len(EXPERTS) * expert
    shapes = Shapes.tiny() if args.preset == "moon-tiny" else Shapes()
    products = synthetic_products(args.products, shapes, args.seed)
    queries = synthetic_queries(args.queries, shapes, args.seed + 1)
    f_p = count_flops(bcfg, products, moe_ids, 1)
    f_q = count_flops(bcfg, queries, moe_ids, 1)
    step = train_flops(f_p, args.trainable == "all") + train_flops(f_q, args.trainable == "all")
    tokens = f_p["llm_tokens"] + f_q["llm_tokens"]
    hidden_bytes = (
        2 * t.hidden_size * tokens * n_layers
        + 2 * bcfg.vision_config.hidden_size * (f_p["patches"] + f_q["patches"]) * bcfg.vision_config.depth
    )
    # weights read in the forward, the recomputation and the backward; trainable ones also: gradient
    # written, then AdamW reads param/grad/m/v and writes param/m/v (all bf16); layer inputs saved
    # by checkpointing written once and read twice
    step_bytes = 3 * 2 * n_total + 2 * n_trainable * (1 + 7) + 3 * hidden_bytes
    compute_s = step / (peak_tflops * 1e12)
    return {
        "preset": args.preset,
        "moe_layers": len(moe_ids),
        "params": {"dense_backbone": n_dense, "vision": n_vision, "embedding_table": n_embed, "moe_extra": n_experts,
                   "total": n_total, "trainable": n_trainable},
        "batch": {"products": len(products), "queries": len(queries), "llm_tokens": tokens,
                  "padded_fraction": padding_fraction(products, queries),
                  "patches": f_p["patches"] + f_q["patches"]},
        "forward_gflop_per_product": {k: v / len(products) / 1e9 for k, v in f_p.items() if k not in ("llm_tokens", "patches")},
        "forward_gflop_per_query": {k: v / len(queries) / 1e9 for k, v in f_q.items() if k not in ("llm_tokens", "patches")},
        "train_step_tflop": step / 1e12,
        "train_step_bytes_gb": step_bytes / 1e9,
        "compute_bound_s_at_peak": compute_s,
        "memory_bound_s": {f"{bw} TB/s": step_bytes / (bw * 1e12) for bw in bandwidths_tbs},
        "products_per_s_at_100pct_mfu": len(products) / compute_s,
        "products_per_s_at_40pct_mfu": 0.4 * len(products) / compute_s,
        "embed_products_per_s_at_100pct_mfu": 1e12 * peak_tflops / (f_p["total"] / len(products)),
        "moe_over_dense_flop_ratio": step / (train_flops(count_flops(bcfg, products, [], 1), True)
                                             + train_flops(count_flops(bcfg, queries, [], 1), True)),
        "peak_tflops_assumed": peak_tflops,
    }  # fmt: skip


def padding_fraction(*sides: Sequence[EncodedInput]) -> float:
    """Share of padded LLM positions when each side is right-padded as one batch."""
    real = padded = 0
    for items in sides:
        real += sum(len(x) for x in items)
        padded += len(items) * max(len(x) for x in items)
    return 1 - real / padded


def profile_step(step: Callable[[], None], device: torch.device, out: str, name: str) -> dict:
    """Profile one step; write its top-40 op/kernel table to ``out/profile-<name>.txt``.

    Returns the wall time of the profiled step, the summed GPU kernel time, the number of kernel
    launches and the share of kernel time in matrix products (where the time goes).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_cpu_time_total"
    summary: dict[str, Any] = {"file": f"profile-{name}.txt", "wall_s": wall}
    if cuda:
        kernels = [e for e in events if e.device_type.name in ("CUDA", "PrivateUse1")]
        attr = (
            "self_device_time_total"
            if kernels and hasattr(kernels[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
        sort = attr
        kernel_us = sum(getattr(e, attr) for e in kernels)
        matmul_us = sum(
            getattr(e, attr)
            for e in kernels
            if any(k in e.key.lower() for k in ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet"))
        )
        attn_us = sum(
            getattr(e, attr) for e in kernels if any(k in e.key.lower() for k in ("flash", "attention", "fmha"))
        )
        summary.update(
            kernel_s=kernel_us / 1e6,
            kernel_launches=sum(e.count for e in kernels),
            matmul_share_of_kernel_time=matmul_us / kernel_us if kernel_us else None,
            attention_share_of_kernel_time=attn_us / kernel_us if kernel_us else None,
            gpu_busy_share_of_wall=kernel_us / 1e6 / wall,
        )
    path = Path(out) / summary["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=sort, row_limit=40) + "\n", encoding="utf-8")
    return summary


def summary_line(res: dict) -> str:
    if res.get("status") != "ok":
        return f"{res.get('status')}: {res.get('error', res.get('reason', ''))}"
    mfu = res.get("mfu")
    mem = res.get("peak_memory_gb")
    return (
        f"{res['seconds_median'] * 1000:.1f} ms  {res['products_per_s']:.2f} products/s  "
        f"{res['llm_tokens_per_s']:.0f} tok/s  MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}  "
        f"mem {'-' if mem is None else f'{mem:.1f} GB'}"
    )


def ours_configs(args: argparse.Namespace) -> list[tuple[bool, int | None]]:
    """The (checkpointing, chunk) configurations of ``train_ours`` to try, from ``--ours``."""
    out = []
    for spec in args.ours.split(","):
        ckpt, _, chunk = spec.partition(":")
        out.append((ckpt == "ckpt", int(chunk) if chunk and chunk != "none" else None))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke run)")
    p.add_argument("--preset", default="moon-3b", choices=sorted(PRESETS))
    p.add_argument("--moe-layers", default="all", choices=["all", "last4"])
    p.add_argument("--trainable", default="frozen-experts", choices=["frozen-experts", "all"])
    p.add_argument("--products", type=int, default=32, help="products per training batch")
    p.add_argument("--queries", type=int, default=32, help="queries per training batch")
    p.add_argument("--embed-products", type=int, default=128, help="products embedded per embedding run")
    p.add_argument("--embed-batch", type=int, default=32)
    p.add_argument("--hf-checkpointing", type=lambda s: s == "on", default=True, help="on/off")
    p.add_argument(
        "--ours",
        default="ckpt:none,nockpt:4,ckpt:16",
        help="train_ours configurations, comma-separated CKPT:CHUNK with CKPT ckpt|nockpt, CHUNK an int or none",
    )
    p.add_argument("--variants", default="peak,train_hf,train_ours,train_ours_dense,embed_naive,embed_ours")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting variants after this many seconds")
    p.add_argument("--min-variant-s", type=float, default=30.0, help="skip a variant with less time than this left")
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one train_hf and one train_ours step (tables to OUT/profile-*.txt)",
    )
    p.add_argument("--quick", action="store_true", help="tiny batches, 1 repeat (smoke runs)")
    p.add_argument("--fail-fast", action="store_true", help="raise on a non-OOM error instead of recording it")
    p.add_argument(
        "--attention",
        choices=list(packed.BACKENDS),
        default="auto",
        help="packed attention backend of the library (moon.model.packed.ATTENTION_BACKEND)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor", action="store_true", help="print the FLOP/byte floor of the configured batch and exit")
    p.add_argument("--out", default=".", help="folder for gpu-<card>-<date>.json (and the profile table): $OUT there")
    args = p.parse_args(argv)
    if args.quick:
        args.products, args.queries, args.embed_products, args.embed_batch = 4, 4, 4, 2
        args.warmup, args.repeats, args.min_variant_s = 0, 1, 0.0
        if args.ours == p.get_default("ours"):
            args.ours = "ckpt:none,nockpt:2"
    return args


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"cpu-{platform.machine()}"
    return torch.cuda.get_device_name(device)


def device_properties(device: torch.device) -> dict[str, Any] | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "total_memory_gb": props.total_memory / 1e9,
        "multiprocessors": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
    }


def card_slug(name: str) -> str:
    for key in ("H200", "H100"):
        if key in name:
            return key.lower()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.floor:
        report = floor_report(args)
        print(json.dumps(report, indent=2))
        return report
    t_start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu for a smoke run")
    smoke = device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.attention != "auto":
        packed.ATTENTION_BACKEND = args.attention
    shapes = Shapes.tiny() if args.preset == "moon-tiny" else Shapes()
    variants = args.variants.split(",")
    peak = measure_bf16_peak(device) if "peak" in variants else None
    print(f"bf16 peak: {peak if peak is None else f'{peak:.0f} TFLOP/s'}", flush=True)

    t0 = time.monotonic()
    emb = build_model(args.preset, args.moe_layers, device, dtype)
    build_s = time.monotonic() - t0
    n_params = sum(p.numel() for p in emb.parameters())
    print(
        f"built {args.preset} ({n_params / 1e9:.2f} B params, MoE layers {len(emb.moe_layer_ids)}) in {build_s:.0f} s"
    )
    # the kernel probes of the fast path, run once here (outside any timed, checkpointed or no-grad
    # forward): what the "ours" variants will use on this device and dtype
    attention_backend = packed.attention_backend_name(device, dtype)
    moe_dispatch = "grouped_mm" if grouped_mm_works(device, dtype) else "loop"
    print(f"fast path: attention {attention_backend}, MoE dispatch {moe_dispatch}", flush=True)
    bench = Bench(
        emb=emb,
        device=device,
        products=synthetic_products(args.products, shapes, args.seed),
        queries=synthetic_queries(args.queries, shapes, args.seed + 1),
        args=args,
        peak_tflops=peak,
        deadline=t_start + args.budget_s,
    )
    if "train_hf" in variants:
        bench.variant("train_hf", bench.train_hf)
        if bench.results["train_hf"]["status"] == "oom" and args.products > 1:
            # the plain way does not fit this batch: measure it at half the batch (throughput compares)
            full = bench.products, bench.queries
            bench.products, bench.queries = full[0][: len(full[0]) // 2], full[1][: len(full[1]) // 2]
            bench.variant("train_hf_half_batch", bench.train_hf)
            bench.products, bench.queries = full
    best: tuple[bool, int | None] | None = None
    if "train_ours" in variants:
        best_t = math.inf
        for ckpt, chunk in ours_configs(args):
            name = f"train_ours[{'ckpt' if ckpt else 'nockpt'},chunk={chunk}]"
            bench.variant(name, lambda c=ckpt, k=chunk: bench.train_ours(c, k))
            r = bench.results[name]
            if r["status"] == "ok" and r["seconds_median"] < best_t:
                best, best_t = (ckpt, chunk), r["seconds_median"]
        if best is not None:
            bench.results["train_ours_best"] = f"train_ours[{'ckpt' if best[0] else 'nockpt'},chunk={best[1]}]"
    if "train_ours_dense" in variants and best is not None and emb.moe_layer_ids:
        bench.variant("train_ours_dense", lambda: bench.train_ours(best[0], best[1], dense=True))
    embed_items = synthetic_products(args.embed_products, shapes, args.seed + 2)
    bench.products = embed_items
    if "embed_naive" in variants:
        bench.variant("embed_naive", lambda: bench.embed(ours=False))
    if "embed_ours" in variants:
        bench.variant("embed_ours", lambda: bench.embed(ours=True))

    r = bench.results
    ratios: dict[str, float | None] = {}
    best_name = r.get("train_ours_best")
    hf_name = next((n for n in ("train_hf", "train_hf_half_batch") if r.get(n, {}).get("status") == "ok"), None)
    if best_name and hf_name:
        ratios["train_ours_over_hf_throughput"] = r[best_name]["products_per_s"] / r[hf_name]["products_per_s"]
        ratios["train_hf_variant_compared"] = hf_name
    if best_name and r.get("train_ours_dense", {}).get("status") == "ok":
        ratios["moe_step_over_dense_step"] = r[best_name]["seconds_median"] / r["train_ours_dense"]["seconds_median"]
    if r.get("embed_naive", {}).get("status") == "ok" and r.get("embed_ours", {}).get("status") == "ok":
        ratios["embed_ours_over_naive_throughput"] = (
            r["embed_ours"]["products_per_s"] / r["embed_naive"]["products_per_s"]
        )

    import transformers

    name = card_name(device)
    report = {
        "smoke_run": smoke,
        "note": "CPU smoke run of the code paths: NOT GPU numbers" if smoke else "GPU measurement",
        "card": name,
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_properties": device_properties(device),
        "bf16_peak_tflops_measured": peak,
        "bf16_peak_tflops_datasheet": next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None),
        "preset": args.preset,
        "moe_layers": emb.moe_layer_ids,
        "trainable": args.trainable,
        "params_total": n_params,
        "params_trainable": sum(p.numel() for p in set_trainable(emb, args.trainable)),
        "build_s": build_s,
        # what the "ours" variants ran (the packed path and moe_dispatch="auto" on this device/dtype)
        "packed": emb.packing,
        "attention_backend": attention_backend,
        "moe_dispatch": moe_dispatch,
        "batch": {
            "products": args.products,
            "queries": args.queries,
            "embed_products": args.embed_products,
            "embed_batch": args.embed_batch,
            "shapes": shapes.__dict__,
        },
        "args": vars(args),
        "floor": floor_report(args, peak or 790.0),
        "results": r,
        "ratios": ratios,
        "total_s": time.monotonic() - t_start,
    }
    prefix = "cpu-smoke" if smoke else "gpu"
    out = Path(args.out) / f"{prefix}-{card_slug(name)}-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_table(report)
    print(f"wrote {out}")
    return report


def print_table(report: dict) -> None:
    print(
        f"\n{'CPU SMOKE RUN - not GPU numbers' if report['smoke_run'] else report['card']}  peak {report['bf16_peak_tflops_measured']}"
    )
    print(f"{'variant':40s} {'status':7s} {'s/step':>8s} {'prod/s':>8s} {'tok/s':>9s} {'MFU':>6s} {'mem GB':>7s}")
    for name, res in report["results"].items():
        if not isinstance(res, dict) or "status" not in res:
            continue
        if res["status"] != "ok":
            print(f"{name:40s} {res['status']:7s}")
            continue
        mfu = res.get("mfu")
        mem = res.get("peak_memory_gb")
        print(
            f"{name:40s} {'ok':7s} {res['seconds_median']:8.3f} {res['products_per_s']:8.2f} "
            f"{res['llm_tokens_per_s']:9.0f} {'-' if mfu is None else f'{100 * mfu:5.1f}%':>6s} "
            f"{'-' if mem is None else f'{mem:7.1f}':>7s}"
        )
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
