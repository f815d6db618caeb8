"""`moon demo` and `moon ablate`."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output directory (stages are cached here).",
)
@click.option("--quick", is_flag=True, help="A smaller world and budget (120 products, 20 steps).")
@click.option("--products", type=int, default=None, help="Override the world size.")
@click.option("--steps", type=int, default=None, help="Override the training steps (the same for every model).")
@click.option("--seed", type=int, default=None, help="Override the seed.")
def demo(out: str, quick: bool, products: int | None, steps: int | None, seed: int | None) -> None:
    """From nothing to a trained MOON evaluated against baselines, with a visual report.

    Stages: generate the product world → train the learned detector and crop every image → train
    MOON (moon-smol, pretrained) and the baselines (two-tower from the same pretrained parts,
    pretrained-towers) on equal budgets →
    evaluate everything (each trained model's best checkpoint by validation, plus the random
    floor) → DIR/report.md and DIR/report.html.
    Re-running reuses finished stages.
    """
    from moon.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick() if quick else DemoConfig()
    if products is not None:
        cfg.products = products
    if steps is not None:
        cfg.steps = steps
    if seed is not None:
        cfg.seed = seed
    path = run_demo(out, cfg, log=lambda m: click.echo(m, err=True))
    click.echo(f"report: {path} (and {path.with_suffix('.md')})")


@click.command()
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Ablation YAML: configs/ablate-smol.yaml (pretrained moon-smol), ablate-small.yaml, ablate-tiny.yaml.",
)
@click.option(
    "--out",
    default="ablate-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output directory (stages are cached).",
)
@click.option("--seeds", type=int, default=None, help="Use seeds 0..N-1 instead of the config's list.")
def ablate(config_file: str, out: str, seeds: int | None) -> None:
    """Full MOON vs no crops, dense (no MoE), learned-only router, no hard negatives, with a memory
    queue, and in-batch-only negatives (the config's `variants` picks among them).

    Writes OUT/ablation.md (mean ± std over seeds), OUT/ablation.json and OUT/ablation.png. Runs go
    seed by seed (every variant of the first seed, then the next), and the files are rewritten after
    each finished run, marked partial until the last; rerunning the same command resumes (finished
    runs are cached stages).
    """
    from moon.demo.ablate import AblationConfig, run_ablation

    cfg = AblationConfig.from_yaml(config_file)
    if seeds is not None:
        if seeds < 1:
            raise click.BadParameter("must be at least 1", param_hint="--seeds")
        cfg.seeds = list(range(seeds))
    path = run_ablation(out, cfg, log=lambda m: click.echo(m, err=True))
    click.echo(path.read_text(encoding="utf-8"))
