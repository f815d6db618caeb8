"""Train the learned detector's heads on a store's true boxes (``moon detect train``).

Features of the frozen backbone are computed once per training image — of the whole image for the
first head and of ``refine_draws`` (default 2) jittered windows around the true box for the refining
head — and cached in memory (float16, ``(N, C, G, G)``), so the epochs only run the light heads (in
bfloat16 where the CPU has native bf16, see :mod:`moon.regions.backbone`). Images are the ``train`` side of
:func:`moon.regions.samples.iter_samples`; 5 % of them (at most 100) are kept aside to report a
validation IoU.
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moon import progress
from moon.data import ImageLoadError, ProductStore, load_image
from moon.errors import ConfigError, DataError
from moon.regions.backbone import LiteFeatures, native_bf16, to_input
from moon.regions.learned import BoxHead, LearnedDetector, decode, head_loss, unflip_boxes
from moon.regions.refine_window import crop_window, image_to_window, jitter_box, refine_window
from moon.regions.samples import ImageSample, iter_samples


@dataclass
class TrainReport:
    """What a training run did: image counts by kind, skipped images, losses, validation IoU, seconds."""

    images: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    val_iou: float = 0.0
    val_iou_first: float = 0.0
    final_loss: float = 0.0
    seconds_features: float = 0.0
    seconds_train: float = 0.0


#: default share of the training budget per image kind (relative weights; scenes are the hard kind)
KIND_WEIGHTS = {"scene": 3.0, "query": 1.5}


def _pick(
    samples: list[ImageSample], max_images: int, rng: random.Random, weights: dict[str, float] | None = None
) -> list[ImageSample]:
    """At most ``max_images`` samples, shared across kinds by ``weights`` (default 1; small kinds kept whole)."""
    weights = KIND_WEIGHTS if weights is None else weights
    by_kind: dict[str, list[ImageSample]] = {}
    for s in samples:
        by_kind.setdefault(s.kind, []).append(s)
    for group in by_kind.values():
        rng.shuffle(group)
    picked: list[ImageSample] = []
    kinds = sorted(by_kind, key=lambda k: (len(by_kind[k]) / weights.get(k, 1.0), k))
    budget = max_images
    for i, kind in enumerate(kinds):
        rest = sum(weights.get(k, 1.0) for k in kinds[i:])
        share = int(budget * weights.get(kind, 1.0) / rest)
        take = by_kind[kind][:share]
        picked.extend(take)
        budget -= len(take)
    rng.shuffle(picked)
    return picked


@dataclass
class _Cache:
    """Backbone features ``(N, C, G, G)`` (float16) and true boxes ``(N, 4)`` in [0, 1] of one pass."""

    feats: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)

    def add(self, feats: torch.Tensor, boxes: list[list[float]]) -> None:
        self.feats.append(feats.to(torch.float16))
        self.targets.append(torch.tensor(boxes, dtype=torch.float32).clamp(0.0, 1.0))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.feats), torch.cat(self.targets)


def _features(
    extractor: LiteFeatures,
    store: ProductStore,
    samples: list[ImageSample],
    input_size: int,
    batch_size: int,
    show_progress: bool,
    report: TrainReport,
    refine: tuple[int, float, random.Random] | None = None,
    draws: int = 1,
) -> tuple[_Cache, _Cache | None]:
    """Features of every readable sample for the first pass and, with ``refine=(size, context, rng)``,
    of ``draws`` jittered refine windows per sample (the windows slightly wrong first boxes would give),
    stored sample by sample: rows ``i * draws … (i + 1) * draws - 1`` belong to the ``i``-th sample."""
    first, second = _Cache(), (_Cache() if refine else None)
    with progress.bar(len(samples), "backbone features", enabled=show_progress, unit="img") as bar:
        for start in range(0, len(samples), batch_size):
            images, boxes, crops, crop_boxes = [], [], [], []
            for s in samples[start : start + batch_size]:
                try:
                    im = load_image(store.path(s.image))
                except ImageLoadError as exc:
                    report.skipped.append(f"{s.image}: {exc.reason}")
                    continue
                w, h = im.size
                x0, y0, x1, y1 = s.truth  # type: ignore[misc]
                images.append(im)
                boxes.append([x0 / w, y0 / h, x1 / w, y1 / h])
                if refine:
                    size, context, rng = refine
                    for _ in range(draws):
                        win = refine_window(jitter_box(s.truth, rng), im.size, context)  # type: ignore[arg-type]
                        crops.append(crop_window(im, win, size))
                        crop_boxes.append(list(image_to_window(s.truth, win)))  # type: ignore[arg-type]
            if images:
                first.add(extractor(to_input(images, input_size)), boxes)
                if second is not None and refine:
                    second.add(extractor(to_input(crops, refine[0])), crop_boxes)
            bar.update(min(batch_size, len(samples) - start))
    if not first.feats:
        raise DataError(f"{store.root}: no readable training image with a true box")
    return first, second


def _fit_head(
    feats: torch.Tensor,
    targets: torch.Tensor,
    *,
    width: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    flip: bool,
    show_progress: bool,
    desc: str,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[BoxHead, float]:
    """Train a :class:`BoxHead` on cached ``(N, C, G, G)`` features and ``(N, 4)`` boxes; returns it (eval
    mode) and the last epoch's mean loss. Runs channels-last, under bfloat16 autocast where the CPU has
    native bf16 (the head's outputs and the loss stay float32)."""
    torch.manual_seed(seed)
    head = BoxHead(feats.shape[1], width).to(memory_format=torch.channels_last)
    bf16 = native_bf16()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, -(-feats.shape[0] // batch_size))
    steps = epochs * steps_per_epoch
    # OneCycleLR divides by zero when its warm-up phase is exactly one step (pct_start × steps == 1)
    pct = 0.1 if steps != 10 else 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct)
    bar = progress.bar(epochs, desc, enabled=show_progress, unit="epoch", iterable=range(epochs))
    gen = torch.Generator().manual_seed(seed)
    final = 0.0
    for epoch in bar:
        head.train()
        order = torch.randperm(feats.shape[0], generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            f, t = feats[idx], targets[idx]
            if flip and torch.rand((), generator=gen) < 0.5:  # horizontal flip of the map and the box
                f = f.flip(-1)
                t = unflip_boxes(t)
            f = f.to(torch.bfloat16 if bf16 else torch.float32).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, boxes = head(f)
            loss, _ = head_loss(logits, boxes, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        final = total / max(1, feats.shape[0])
        bar.set_postfix(loss=f"{final:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, final)
    return head.to(memory_format=torch.contiguous_format).eval(), final


def _iou_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ix = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    iy = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = ix * iy
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / union.clamp(min=1e-9)


def _reuse_freed_memory() -> None:
    """Let glibc keep freed blocks up to 256 MiB in the heap instead of unmapping them: the backbone and
    head steps allocate the same ~10–30 MB tensors over and over, and fresh pages for each cost about as
    much kernel time as the convolutions themselves. A no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def train_learned(
    store_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_images: int = 5000,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 64,
    input_size: int = 224,
    refine: bool = True,
    refine_size: int = 160,
    context: float = 1.5,
    refine_draws: int = 2,
    refine_epochs: int | None = None,
    refine_rounds: int = 1,
    refine_flip: bool = True,
    stride8: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
    flip: bool = False,
    show_progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[LearnedDetector, TrainReport]:
    """Train the detector on the store's ``train`` images with true boxes and save it to ``out_dir``.

    The first head sees the whole image at ``input_size``; with ``refine`` a second head learns to
    re-box the product on ``refine_size`` windows of ``context`` × a jittered true box (the window a
    slightly wrong first box gives), ``refine_draws`` windows per image, for ``refine_epochs`` epochs
    (default: ``epochs / refine_draws`` rounded up, as many steps as the first head); the detector runs
    the refining pass ``refine_rounds`` times, with ``refine_flip`` also on the mirrored window (inference
    settings, no extra training). With ``stride8`` both heads also read the stride-8 map.
    Returns the detector (ready to use) and a :class:`TrainReport` (``val_iou``: the whole detector on
    held-aside images, ``val_iou_first``: the first pass alone). ``on_epoch(epoch, loss)`` is called
    after each epoch of the first head.
    """
    for name, size in (("input size", input_size), ("refine size", refine_size)):
        if size < 64 or size % 32:
            raise ConfigError(f"{name} {size} must be a multiple of 32, at least 64")
    if context < 1.0:
        raise ConfigError(f"refine context {context} must be at least 1 (the window holds the whole box)")
    if refine_draws < 1 or refine_rounds < 1 or (refine_epochs is not None and refine_epochs < 1):
        raise ConfigError(
            f"refine draws ({refine_draws}), rounds ({refine_rounds}) and epochs ({refine_epochs}) must be at least 1"
        )
    _reuse_freed_memory()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    store = ProductStore(store_dir)
    pool = [s for s in iter_samples(store, test_fraction=test_fraction) if s.split == "train" and s.truth is not None]
    if not pool:
        raise DataError(f"{store.root}: no train-split image has a true box (boxes.parquet, source=truth)")
    chosen = _pick(pool, max_images, rng)
    report = TrainReport(images=dict(Counter(s.kind for s in chosen)))
    t0 = time.perf_counter()
    extractor = LiteFeatures(stride8=stride8)
    jitter = (refine_size, context, random.Random(seed + 1)) if refine else None
    first, second = _features(extractor, store, chosen, input_size, 32, show_progress, report, jitter, refine_draws)
    feats, targets = first.tensors()
    report.seconds_features = time.perf_counter() - t0
    n = feats.shape[0]
    n_val = min(100, max(1, n // 20)) if n >= 20 else 0
    fit = dict(
        width=width, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, flip=flip, show_progress=show_progress
    )
    t0 = time.perf_counter()
    head, report.final_loss = _fit_head(feats[n_val:], targets[n_val:], desc="train head", on_epoch=on_epoch, **fit)
    refine_head = None
    if second is not None:
        rfeats, rtargets = second.tensors()
        fit["epochs"] = refine_epochs or -(-epochs // refine_draws)
        held = n_val * refine_draws
        refine_head, _ = _fit_head(rfeats[held:], rtargets[held:], desc="train refining head", **fit)
    report.seconds_train = time.perf_counter() - t0
    det = LearnedDetector(
        head,
        input_size=input_size,
        features=extractor,
        refine=refine_head,
        refine_size=refine_size,
        context=context,
        refine_rounds=refine_rounds,
        refine_flip=refine_flip,
    )
    if n_val:
        with torch.no_grad():
            pred, _ = decode(*head(feats[:n_val].float()))
        report.val_iou_first = float(_iou_each(pred.clamp(0.0, 1.0), targets[:n_val]).mean())
        report.val_iou = (
            _val_iou(det, store, chosen, n_val, report) if refine_head is not None else report.val_iou_first
        )
    det.meta = {
        "trained_on": str(store.root),
        "train_images": report.images,
        "test_fraction": test_fraction,
        "seed": seed,
        "epochs": epochs,
        "refine_draws": refine_draws if refine else 0,
        "refine_epochs": fit["epochs"] if refine else 0,
        "val_iou": round(report.val_iou, 4),
        "val_iou_first_pass": round(report.val_iou_first, 4),
    }
    det.save(Path(out_dir))
    return det, report


def _val_iou(
    det: LearnedDetector, store: ProductStore, chosen: list[ImageSample], n_val: int, report: TrainReport
) -> float:
    """Mean IoU of the whole (two-pass) detector on the first ``n_val`` readable chosen samples (held aside)."""
    skipped = {line.split(": ", 1)[0] for line in report.skipped}
    readable = [s for s in chosen if s.image not in skipped][:n_val]
    ious = []
    for start in range(0, len(readable), 32):
        batch = readable[start : start + 32]
        images = [load_image(store.path(s.image)) for s in batch]
        for s, im, dets in zip(batch, images, det.detect_batch(images), strict=True):
            w, h = im.size
            pred = torch.tensor([dets[0].box]) / torch.tensor([w, h, w, h])
            truth = torch.tensor([s.truth]) / torch.tensor([w, h, w, h])
            ious.append(float(_iou_each(pred, truth)[0]))
    return sum(ious) / max(1, len(ious))
