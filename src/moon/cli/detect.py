"""`moon detect …`: core product region detection (train, eval, run, gallery)."""

from __future__ import annotations

import json

import click

from moon.regions.registry import DETECTORS

_DETECTOR = click.option(
    "--detector", type=click.Choice(DETECTORS), default="learned", show_default=True, help="Which detector to use."
)
_MODEL = click.option(
    "--model",
    default=None,
    help="learned: the directory written by `moon detect train`; grounding: a Qwen2.5-VL directory or hub id.",
)
_THREADS = click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads (default: torch's choice)."
)
_DATA = click.option(
    "--data", "data_dir", required=True, type=click.Path(file_okay=False, exists=True), help="Product store directory."
)


@click.group()
def detect() -> None:
    """Core product region detection: train, eval, run, gallery."""


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@detect.command()
@_DATA
@_THREADS
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where to write the detector.")
@click.option("--max-images", default=5000, show_default=True, help="Training images (scene-weighted across kinds).")
@click.option("--epochs", default=25, show_default=True)
@click.option("--input-size", default=224, show_default=True, help="Square input side (a multiple of 32).")
@click.option(
    "--refine/--no-refine", default=True, show_default=True, help="Train the second, refining pass on box windows."
)
@click.option("--refine-size", default=160, show_default=True, help="Refine window input side (a multiple of 32).")
@click.option("--context", default=1.5, show_default=True, help="Refine window side / the first box's longer side.")
@click.option("--refine-draws", default=2, show_default=True, help="Jittered refine windows per training image.")
@click.option(
    "--refine-epochs", type=int, default=None, help="Refining head epochs (default: epochs / refine draws, rounded up)."
)
@click.option("--refine-rounds", default=1, show_default=True, help="Times the detector runs the refining pass.")
@click.option(
    "--refine-flip/--no-refine-flip",
    default=True,
    show_default=True,
    help="Average the refined box with the one found on the mirrored window.",
)
@click.option(
    "--stride8/--no-stride8", default=True, show_default=True, help="Heads also read the stride-8 feature map."
)
@click.option("--seed", default=0, show_default=True)
def train(
    data_dir: str,
    threads: int | None,
    out_dir: str,
    max_images: int,
    epochs: int,
    input_size: int,
    refine: bool,
    refine_size: int,
    context: float,
    refine_draws: int,
    refine_epochs: int | None,
    refine_rounds: int,
    refine_flip: bool,
    stride8: bool,
    seed: int,
) -> None:
    """Train the learned detector (box heads on frozen EfficientNet-Lite0) on the store's true boxes."""
    _set_threads(threads)
    from moon.regions.training import train_learned

    _, report = train_learned(
        data_dir,
        out_dir,
        max_images=max_images,
        epochs=epochs,
        input_size=input_size,
        refine=refine,
        refine_size=refine_size,
        context=context,
        refine_draws=refine_draws,
        refine_epochs=refine_epochs,
        refine_rounds=refine_rounds,
        refine_flip=refine_flip,
        stride8=stride8,
        seed=seed,
    )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.images.items()))
    click.echo(f"trained on {sum(report.images.values())} images ({kinds})")
    click.echo(
        f"features {report.seconds_features:.0f}s, heads {report.seconds_train:.0f}s; final loss {report.final_loss:.3f}; "
        f"validation IoU {report.val_iou:.3f} (first pass {report.val_iou_first:.3f})"
    )
    for s in report.skipped:
        click.echo(f"skipped {s}", err=True)
    click.echo(f"saved to {out_dir}")


@detect.command(name="eval")
@_DATA
@_THREADS
@_DETECTOR
@_MODEL
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "all"]))
@click.option("--max-per-kind", type=int, default=None, help="Evaluate at most this many images of each kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def eval_(
    data_dir: str,
    threads: int | None,
    detector: str,
    model: str | None,
    split: str,
    max_per_kind: int | None,
    as_json: bool,
) -> None:
    """Mean IoU, hit rate at IoU ≥ 0.5 and ms per image, by image kind (clean, scene, banner …)."""
    _set_threads(threads)
    from moon.regions.evaluate import evaluate_detector, format_report
    from moon.regions.registry import load_detector

    det = load_detector(detector, model)
    report = evaluate_detector(
        data_dir, det, split=None if split == "all" else split, max_per_kind=max_per_kind, show_progress=not as_json
    )
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_report(report))


@detect.command()
@_DATA
@_THREADS
@_DETECTOR
@_MODEL
@click.option("--pad", default=0.05, show_default=True, help="Grow boxes by this fraction on each side.")
@click.option("--max-area", default=0.85, show_default=True, help="Skip crops covering more of the image than this.")
@click.option("--min-area", default=0.005, show_default=True, help="Skip crops covering less of the image than this.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Images per learned-detector call (1: one at a time; see docs/regions.md, Batches).",
)
def run(
    data_dir: str,
    threads: int | None,
    detector: str,
    model: str | None,
    pad: float,
    max_area: float,
    min_area: float,
    batch_size: int,
) -> None:
    """Detect and crop every image; write boxes.parquet (source=DETECTOR) and crops/ (resumable)."""
    _set_threads(threads)
    from moon.regions.crop_policy import CropPolicy
    from moon.regions.registry import load_detector
    from moon.regions.run import run_detection

    policy = CropPolicy(pad=pad, max_area=max_area, min_area=min_area)
    report = run_detection(data_dir, load_detector(detector, model), policy=policy, batch_size=batch_size)
    click.echo(
        f"{report.images} images ({report.resumed} done by an earlier run): {report.cropped} cropped, "
        f"{report.full_image} kept whole, {len(report.skipped)} skipped; {report.boxes_written} boxes written"
    )
    for s in report.skipped:
        click.echo(f"skipped {s}", err=True)


@detect.command()
@_DATA
@_THREADS
@_DETECTOR
@_MODEL
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="FILE.png or FILE.html")
@click.option("--n", "n_per_kind", default=8, show_default=True, help="Images per kind.")
def gallery(
    data_dir: str, threads: int | None, detector: str, model: str | None, out_file: str, n_per_kind: int
) -> None:
    """Draw predicted (red) vs true (green) boxes on test images."""
    _set_threads(threads)
    from moon.regions.gallery import write_gallery
    from moon.regions.registry import load_detector

    path = write_gallery(data_dir, load_detector(detector, model), out_file, n_per_kind=n_per_kind)
    click.echo(f"wrote {path}")
