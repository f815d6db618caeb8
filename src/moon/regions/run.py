"""Detect and crop every image of a store, resumably (``moon detect run``).

Results are written in chunks to ``STORE/.detect-<detector>/part-NNNNNN.parquet`` (each file
written to a temp name and renamed, so a killed run leaves only whole parts). A re-run with the same
detector and crop policy skips the images already in the parts; when all are done the parts are
merged into ``boxes.parquet`` (``source=<detector>``, ``crop`` = ``crops/<detector>/<key>.jpg``)
and removed. Unreadable images are reported and skipped, never fatal.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from moon import progress
from moon.data import Box, ProductStore, image_sha1, load_image
from moon.data.store import replace_boxes
from moon.errors import ConfigError, DataError
from moon.regions.base import Detector, clamp_box, full_image_box
from moon.regions.crop_cache import CropCache, CropEntry, crop_key
from moon.regions.crop_policy import CropPolicy, crop_image
from moon.regions.samples import ImageSample, iter_samples

if TYPE_CHECKING:
    from PIL import Image

PART_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("score", pa.float32()),
        ("crop", pa.string()),
        ("kind", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass
class RunReport:
    """What ``detect run`` did: images total, resumed (already done), cropped, kept whole, skipped."""

    images: int = 0
    resumed: int = 0
    cropped: int = 0
    full_image: int = 0
    cache_hits: int = 0
    skipped: list[str] = field(default_factory=list)
    boxes_written: int = 0


def _detect_group(
    store: ProductStore,
    group: list[ImageSample],
    detector: Detector,
    policy: CropPolicy,
    cache: CropCache,
    report: RunReport,
) -> dict[str, CropEntry | str]:
    """``{image: crop-cache entry}`` for a group of samples, or ``{image: error text}`` for one that
    cannot be read: cached entries first, the rest detected together (``detect_batch``) or one by one."""
    out: dict[str, CropEntry | str] = {}
    misses: list[tuple[ImageSample, Image.Image, str]] = []  # (sample, image, cache key)
    for s in group:
        try:
            path = store.path(s.image)
            image = load_image(path)
            key = crop_key(image_sha1(path), detector.fingerprint(), policy)
        except DataError as exc:
            out[s.image] = getattr(exc, "reason", None) or str(exc)
            continue
        entry = cache.get(key)
        if entry is None:
            misses.append((s, image, key))
        else:
            report.cache_hits += 1
            out[s.image] = entry
    batch = getattr(detector, "detect_batch", None)
    if batch is not None and len(misses) > 1:
        found = batch([image for _, image, _ in misses])
    else:
        found = [detector.detect(image, s.title) for s, image, _ in misses]
    for (s, image, key), dets in zip(misses, found, strict=True):
        det = dets[0] if dets else None
        box = clamp_box(det.box, image.size) if det else None
        score = det.score if det and box else 0.0
        box = box or full_image_box(image.size)
        crop_box = policy.choose(dets, image.size)
        out[s.image] = cache.put(key, box, score, crop_box, crop_image(image, crop_box) if crop_box else None)
    return out


def parts_dir(store_root: str | os.PathLike, detector_name: str) -> Path:
    """Where an unfinished run keeps its chunks."""
    return Path(store_root) / f".detect-{detector_name}"


def _read_parts(pdir: Path) -> list[dict]:
    rows: list[dict] = []
    for part in sorted(pdir.glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


def _write_part(pdir: Path, index: int, rows: list[dict]) -> None:
    path = pdir / f"part-{index:06d}.parquet"
    tmp = pdir / f"part-{index:06d}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), tmp)
    os.replace(tmp, path)


def run_detection(
    store_dir: str | os.PathLike,
    detector: Detector,
    *,
    policy: CropPolicy | None = None,
    chunk_size: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
    on_image: Callable[[int, str], None] | None = None,
) -> RunReport:
    """Detect the core region of every product and query image; store boxes and crops.

    Images go to the detector ``batch_size`` at a time when it has ``detect_batch`` (the learned
    detector; one forward per batch instead of per image), one at a time otherwise.

    ``on_image(i, image)`` is called after each image is processed (tests use it to interrupt a run).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    policy = policy or CropPolicy()
    store = ProductStore(store_dir)
    root = store.root
    name = detector.name
    pdir = parts_dir(root, name)
    run_id = {"detector": name, "fingerprint": detector.fingerprint(), "policy": policy.as_dict()}
    if pdir.exists():
        try:
            previous = json.loads((pdir / "run.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != run_id:  # another detector version or policy: its parts are not ours
            shutil.rmtree(pdir)
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / "run.json").write_text(json.dumps(run_id, sort_keys=True), encoding="utf-8")

    samples = list(iter_samples(store))
    done = {r["image"]: r for r in _read_parts(pdir)}
    report = RunReport(images=len(samples), resumed=sum(1 for s in samples if s.image in done))
    cache = CropCache(root / "crops" / name)
    todo = [s for s in samples if s.image not in done]
    part_index = len(list(pdir.glob("part-*.parquet")))
    buffer: list[dict] = []
    bar = progress.bar(len(samples), f"detect {name}", enabled=show_progress, unit="img", initial=report.resumed)
    try:
        for start in range(0, len(todo), batch_size):
            group = todo[start : start + batch_size]
            found = _detect_group(store, group, detector, policy, cache, report)
            for i, s in enumerate(group, start):
                row = {
                    "image": s.image,
                    "x0": None,
                    "y0": None,
                    "x1": None,
                    "y1": None,
                    "score": None,
                    "crop": None,
                    "kind": s.kind,
                    "error": None,
                }
                entry = found[s.image]
                if isinstance(entry, str):  # unreadable image or a path outside the store
                    row["error"] = entry
                else:
                    row.update(zip(("x0", "y0", "x1", "y1"), entry.box, strict=True))
                    row["score"] = entry.score
                    row["crop"] = entry.crop_path.relative_to(root).as_posix() if entry.crop_path else None
                buffer.append(row)
                bar.update(1)
                if len(buffer) >= chunk_size:
                    _write_part(pdir, part_index, buffer)
                    part_index += 1
                    buffer = []
                if on_image is not None:
                    on_image(i, s.image)
        if buffer:
            _write_part(pdir, part_index, buffer)
    finally:
        bar.close()  # its last line, and the summary of warnings raised meanwhile

    results = {r["image"]: r for r in _read_parts(pdir)}
    boxes = []
    for s in samples:
        r = results[s.image]
        if r["error"]:
            report.skipped.append(f"{s.image}: {r['error']}")
            continue
        if r["crop"]:
            report.cropped += 1
        else:
            report.full_image += 1
        boxes.append(
            Box(
                image=s.image,
                x0=r["x0"],
                y0=r["y0"],
                x1=r["x1"],
                y1=r["y1"],
                source=name,
                score=r["score"],
                crop=r["crop"],
                kind=s.kind,
            )
        )
    report.boxes_written = replace_boxes(root, name, boxes)
    shutil.rmtree(pdir)
    return report
