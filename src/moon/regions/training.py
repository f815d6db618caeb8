"""Train the learned detector's head on a store's true boxes (``moon detect train``).

Features of the frozen backbone are computed once per training image and cached in memory
(float16, ``(N, 432, G, G)``), so the epochs only run the light head. Images are the ``train`` side
of :func:`moon.regions.samples.iter_samples`; 5 % of them are kept aside to report a validation IoU.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moon.data import ImageLoadError, ProductStore, load_image
from moon.errors import ConfigError, DataError
from moon.regions.backbone import LiteFeatures, to_input
from moon.regions.learned import BoxHead, LearnedDetector, decode, head_loss
from moon.regions.samples import ImageSample, iter_samples


@dataclass
class TrainReport:
    """What a training run did: image counts by kind, skipped images, losses, validation IoU, seconds."""

    images: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    val_iou: float = 0.0
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


def _features(
    extractor: LiteFeatures,
    store: ProductStore,
    samples: list[ImageSample],
    input_size: int,
    batch_size: int,
    show_progress: bool,
    report: TrainReport,
) -> tuple[torch.Tensor, torch.Tensor]:
    feats, targets = [], []
    bar = tqdm(total=len(samples), desc="backbone features", unit="img", disable=not show_progress)
    for start in range(0, len(samples), batch_size):
        images, boxes = [], []
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
        if images:
            feats.append(extractor(to_input(images, input_size)).to(torch.float16))
            targets.append(torch.tensor(boxes, dtype=torch.float32).clamp(0.0, 1.0))
        bar.update(min(batch_size, len(samples) - start))
    bar.close()
    if not feats:
        raise DataError(f"{store.root}: no readable training image with a true box")
    return torch.cat(feats), torch.cat(targets)


def _iou_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ix = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    iy = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = ix * iy
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / union.clamp(min=1e-9)


def train_learned(
    store_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_images: int = 4000,
    epochs: int = 25,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 64,
    input_size: int = 224,
    test_fraction: float = 0.2,
    seed: int = 0,
    flip: bool = False,
    show_progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[LearnedDetector, TrainReport]:
    """Train a box head on the store's ``train`` images with true boxes; save it to ``out_dir``.

    Returns the detector (ready to use) and a :class:`TrainReport`.
    """
    if input_size < 64 or input_size % 32:
        raise ConfigError(f"input size {input_size} must be a multiple of 32, at least 64")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    store = ProductStore(store_dir)
    pool = [s for s in iter_samples(store, test_fraction=test_fraction) if s.split == "train" and s.truth is not None]
    if not pool:
        raise DataError(f"{store.root}: no train-split image has a true box (boxes.parquet, source=truth)")
    chosen = _pick(pool, max_images, rng)
    report = TrainReport(images=dict(Counter(s.kind for s in chosen)))
    t0 = time.perf_counter()
    extractor = LiteFeatures()
    feats, targets = _features(extractor, store, chosen, input_size, 32, show_progress, report)
    report.seconds_features = time.perf_counter() - t0
    n = feats.shape[0]
    n_val = max(1, n // 20) if n >= 20 else 0
    train_f, train_t = feats[n_val:], targets[n_val:]
    val_f, val_t = feats[:n_val], targets[:n_val]

    head = BoxHead(feats.shape[1], width)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, -(-train_f.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="train head", unit="epoch", disable=not show_progress)
    gen = torch.Generator().manual_seed(seed)
    for epoch in bar:
        head.train()
        order = torch.randperm(train_f.shape[0], generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            f, t = train_f[idx].float(), train_t[idx]
            if flip and torch.rand((), generator=gen) < 0.5:  # horizontal flip of the map and the box
                f = f.flip(-1)
                t = torch.stack([1 - t[:, 2], t[:, 1], 1 - t[:, 0], t[:, 3]], dim=1)
            loss, _ = head_loss(*head(f), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        report.final_loss = total / max(1, train_f.shape[0])
        bar.set_postfix(loss=f"{report.final_loss:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, report.final_loss)
    report.seconds_train = time.perf_counter() - t0
    head.eval()
    if n_val:
        with torch.no_grad():
            pred, _ = decode(*head(val_f.float()))
        report.val_iou = float(_iou_each(pred, val_t).mean())
    meta = {
        "trained_on": str(store.root),
        "train_images": report.images,
        "test_fraction": test_fraction,
        "seed": seed,
        "epochs": epochs,
        "val_iou": round(report.val_iou, 4),
    }
    det = LearnedDetector(head, input_size=input_size, features=extractor, meta=meta)
    det.save(Path(out_dir))
    return det, report
