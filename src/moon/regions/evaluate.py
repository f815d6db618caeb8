"""Score a detector against a store's true boxes, per image kind (``moon detect eval``).

Per kind (``clean``, ``scene``, ``banner``, and any other kind present): number of images, mean IoU
of the top box with the true box, hit rate at IoU ≥ 0.5, and milliseconds per image (the detect
call alone, image decoding excluded). Unreadable images are reported and skipped.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from moon import progress
from moon.data import ImageLoadError, ProductStore, box_iou, load_image
from moon.errors import DataError
from moon.regions.base import Detector, full_image_box
from moon.regions.samples import ImageSample, iter_samples

MAIN_KINDS = ("clean", "scene", "banner")


@dataclass
class KindScore:
    """Scores of one image kind."""

    n: int = 0
    mean_iou: float = 0.0
    hit_rate: float = 0.0
    ms_per_image: float = 0.0


@dataclass
class EvalReport:
    """Per-kind scores (plus ``all``), the split evaluated, skipped images and detector counters."""

    detector: str
    split: str
    kinds: dict[str, KindScore] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "detector": self.detector,
            "split": self.split,
            "kinds": {k: vars(v) for k, v in self.kinds.items()},
            "skipped": self.skipped,
            "counters": self.counters,
        }


def _balanced(samples: list[ImageSample], max_per_kind: int | None) -> list[ImageSample]:
    if max_per_kind is None:
        return samples
    seen: dict[str, int] = defaultdict(int)
    out = []
    for s in samples:
        if seen[s.kind] < max_per_kind:
            seen[s.kind] += 1
            out.append(s)
    return out


def evaluate_detector(
    store_dir: str | os.PathLike,
    detector: Detector,
    *,
    split: str | None = "test",
    kinds: tuple[str, ...] | None = None,
    max_per_kind: int | None = None,
    test_fraction: float = 0.2,
    show_progress: bool = True,
) -> EvalReport:
    """Evaluate ``detector`` on the store images of ``split`` (``None``: all) that have a true box."""
    store = ProductStore(store_dir)
    samples = [
        s
        for s in iter_samples(store, test_fraction=test_fraction)
        if s.truth is not None and (split is None or s.split == split) and (kinds is None or s.kind in kinds)
    ]
    samples = _balanced(samples, max_per_kind)
    if not samples:
        raise DataError(f"{store.root}: no image of split {split!r} has a true box (boxes.parquet, source=truth)")
    ious: dict[str, list[float]] = defaultdict(list)
    secs: dict[str, float] = defaultdict(float)
    report = EvalReport(detector=detector.name, split=split or "all")
    for s in progress.track(samples, f"eval {detector.name}", enabled=show_progress, unit="img"):
        try:
            image = load_image(store.path(s.image))
        except ImageLoadError as exc:
            report.skipped.append(f"{s.image}: {exc.reason}")
            continue
        t0 = time.perf_counter()
        dets = detector.detect(image, s.title)
        secs[s.kind] += time.perf_counter() - t0
        box = dets[0].box if dets else full_image_box(image.size)
        ious[s.kind].append(box_iou(box, s.truth))  # type: ignore[arg-type]
    order = [k for k in MAIN_KINDS if k in ious] + sorted(k for k in ious if k not in MAIN_KINDS)
    all_iou: list[float] = []
    for kind in order:
        vals = ious[kind]
        all_iou.extend(vals)
        report.kinds[kind] = KindScore(
            len(vals), sum(vals) / len(vals), sum(v >= 0.5 for v in vals) / len(vals), 1000 * secs[kind] / len(vals)
        )
    if all_iou:
        total_s = sum(secs.values())
        report.kinds["all"] = KindScore(
            len(all_iou),
            sum(all_iou) / len(all_iou),
            sum(v >= 0.5 for v in all_iou) / len(all_iou),
            1000 * total_s / len(all_iou),
        )
    report.counters = dict(getattr(detector, "stats", {}) or {})
    return report


def format_report(report: EvalReport) -> str:
    """A small text table of an :class:`EvalReport`."""
    lines = [
        f"detector {report.detector}, split {report.split}",
        f"{'kind':<8} {'n':>6} {'mean IoU':>9} {'hit@0.5':>8} {'ms/img':>8}",
    ]
    for kind, s in report.kinds.items():
        lines.append(f"{kind:<8} {s.n:>6} {s.mean_iou:>9.3f} {s.hit_rate:>8.3f} {s.ms_per_image:>8.1f}")
    if report.counters:
        lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(report.counters.items())))
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} unreadable image(s):")
        lines.extend(f"  {s}" for s in report.skipped[:20])
    return "\n".join(lines)
