"""The ``moon`` command: a thin layer that parses arguments and calls the library.

Command groups live in their own modules and are imported only when used, so ``moon --help``
is fast. Any :class:`moon.errors.MoonError`, and any usage error (an unknown option, a value that is
not a number), becomes a one-line ``error: …`` message and exit 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from moon import __version__
from moon.errors import MoonError

# command name → (module, attribute, one-line help). Each module owns one command or group.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "assets": ("moon.cli.assets", "assets", "Pretrained weights that install offline: list, install, verify."),
    "data": ("moon.cli.data", "data", "Product stores: synthesise, import MBE, validate, stats, gallery."),
    "detect": ("moon.cli.detect", "detect", "Core product region detection: train, eval, run, gallery."),
    "embed": ("moon.cli.embed", "embed", "Embed every product of a store into resumable vector shards."),
    "eval": ("moon.cli.eval", "eval_cmd", "Benchmark embedders on MBE-style tasks; compare results."),
    "index": ("moon.cli.index", "index", "Build and update a vector index of a product store."),
    "search": ("moon.cli.search", "search", "Search an index by text and/or photo."),
    "serve": ("moon.cli.serve", "serve", "Serve an index over HTTP (JSON API + search page)."),
    "train": ("moon.cli.train", "train", "Train an embedder contrastively on purchases (torchrun-ready)."),
    "demo": ("moon.cli.demo", "demo", "End to end on the product world: train MOON and baselines, write a report."),
    "ablate": (
        "moon.cli.demo",
        "ablate",
        "Paper-style ablations over seeds (no crops, dense, learned router, in-batch).",
    ),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use.

    ``lazy`` maps a command name to ``(module, attribute, one-line help)``.
    """

    def __init__(self, *args, lazy: dict[str, tuple[str, str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy if lazy is not None else {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr, _ = self.lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = {name: self.lazy[name][2] for name in self.lazy}
        for name in super().list_commands(ctx):
            cmd = super().get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows[name] = cmd.get_short_help_str(limit=100)
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows.items()))


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moon")
def cli() -> None:
    """MOON: product embeddings from a generative multimodal LLM (Qwen2.5-VL or a grafted causal LM).

    Run `moon COMMAND --help` for each command's options.
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr, never a traceback."""
    try:
        cli.main(args=argv, prog_name="moon", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option or value: one line, with where to look
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MoonError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
