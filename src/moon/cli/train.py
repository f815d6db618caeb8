"""`moon train`: contrastive training from a YAML config, a preset, or both (torchrun-ready)."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), default=None, help="YAML recipe (see configs/)."
)
@click.option("--preset", default=None, help="Built-in recipe: moon-tiny, moon-small or moon-3b.")
@click.option(
    "--data", "data_dir", type=click.Path(file_okay=False), default=None, help="Product store to train on (data.dir)."
)
@click.option(
    "--model", "model_spec", default=None, help="Model spec (model.spec): moon-smol, moon-small, two-tower, dual-encoder, a directory …"
)
@click.option("--steps", type=int, default=None, help="Optimizer steps (optim.steps).")
@click.option("--batch-size", type=int, default=None, help="Global batch size (optim.batch_size).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Run directory (run.out).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--seed", type=int, default=None, help="Seed (run.seed).")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@click.argument("overrides", nargs=-1)
def train(
    config_file: str | None,
    preset: str | None,
    data_dir: str | None,
    model_spec: str | None,
    steps: int | None,
    batch_size: int | None,
    out_dir: str | None,
    resume: bool,
    seed: int | None,
    print_config: bool,
    overrides: tuple[str, ...],
) -> None:
    """Train an embedder contrastively on purchases.

    OVERRIDES are section.key=value pairs applied after the config file, e.g.
    `optim.lr=3e-4 negatives.hard=4 model.overrides.moe_mode=dense`; the flags override both.
    Several processes: `torchrun --nproc_per_node N --no-python moon train ...`.
    """
    from moon.errors import ConfigError
    from moon.train import load_config
    from moon.train import train as run_training

    if config_file is None and preset is None:
        raise ConfigError("give --config FILE.yaml or --preset NAME (moon-tiny, moon-small, moon-3b)")
    extra: dict = {}
    if data_dir is not None:
        extra.setdefault("data", {})["dir"] = data_dir
    if model_spec is not None:
        extra.setdefault("model", {})["spec"] = model_spec
    if steps is not None:
        extra.setdefault("optim", {})["steps"] = steps
    if batch_size is not None:
        extra.setdefault("optim", {})["batch_size"] = batch_size
    if out_dir is not None:
        extra.setdefault("run", {})["out"] = out_dir
    if seed is not None:
        extra.setdefault("run", {})["seed"] = seed
    config = load_config(config_file, preset=preset, overrides=overrides, extra=extra)
    if print_config:
        click.echo(config.to_yaml(), nl=False)
        return
    summary = run_training(config, resume=resume)
    if summary["last"]:
        click.echo(
            json.dumps({k: summary[k] for k in ("run_dir", "steps", "best_val_recall@10")} | {"last": summary["last"]})
        )
