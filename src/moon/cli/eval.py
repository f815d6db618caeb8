"""`moon eval`: score an embedder on the MBE-style tasks of a store; `moon eval compare`: models side by side."""

from __future__ import annotations

import json

import click


class _EvalGroup(click.Group):
    """A group that runs its own callback when no subcommand is given (`moon eval --model …`)."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "--model SPEC --data DIR [OPTIONS]")
        formatter.write_usage(ctx.command_path, "compare RESULTS_DIR... --out FILE", prefix="   or: ")


@click.group(
    cls=_EvalGroup, name="eval", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--model",
    "model",
    metavar="SPEC",
    help="Embedder: moon-tiny, a saved dir, random, dual-encoder[:DIR], pretrained-towers[:DIR] …",
)
@click.option("--data", "data", type=click.Path(file_okay=False), help="Product store directory.")
@click.option(
    "--tasks",
    "tasks",
    multiple=True,
    metavar="SEL",
    help="Task names, families (retrieval, classification, attribute, all) or patterns (attribute-*); repeatable or comma-separated. Default: all.",
)
@click.option(
    "--split",
    default="test",
    show_default=True,
    type=click.Choice(["train", "val", "test"]),
    help="Query split for query→product tasks.",
)
@click.option(
    "--crops",
    "crop_source",
    metavar="SOURCE",
    default=None,
    help="Give records the core-region crops of this box source (learned, grounding, truth …) from boxes.parquet.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    help="Output directory (results.json, rankings.jsonl, results.md, PNG plots).",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Encoding batch size.")
@click.option(
    "--max-queries", type=click.IntRange(1), default=None, help="Score a seeded sample of at most N queries per task."
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Embedding cache dir [default: ~/.cache/moon/embeddings].",
)
@click.option("--no-cache", is_flag=True, help="Do not read or write cached embeddings.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout instead of the table.")
@click.pass_context
def eval_cmd(
    ctx: click.Context,
    model,
    data,
    tasks,
    split,
    crop_source,
    out,
    batch_size,
    max_queries,
    cache_dir,
    no_cache,
    no_plots,
    as_json,
) -> None:
    """Benchmark embedders on MBE-style tasks; compare results.

    \b
    Run:      moon eval --model SPEC --data DIR [--tasks SEL] [--split test] --out DIR
    Compare:  moon eval compare RESULTS_DIR... --out FILE(.md|.json|.png)

    Tasks: text2product, image2product, multimodal2product, product2product (Recall@1/5/10, MRR@10,
    nDCG@10), classification-l<L> per category level and attribute-<type> per attribute type
    (zero-shot accuracy, macro-F1; products encoded without category/attributes).
    """
    if ctx.invoked_subcommand is not None:
        return
    if not model or not data:
        raise click.UsageError("moon eval needs --model and --data (or the subcommand `compare`)", ctx=ctx)
    from moon.bench import DEFAULT_CACHE_DIR, EmbeddingCache, evaluate, write_results
    from moon.bench.report import markdown_table
    from moon.data import ProductStore
    from moon.models import load_embedder

    store = ProductStore(data, crop_source=crop_source)
    embedder = load_embedder(model)
    cache = EmbeddingCache(None if no_cache else (cache_dir or DEFAULT_CACHE_DIR))
    result = evaluate(
        embedder,
        store,
        tasks=list(tasks) or None,
        split=split,
        batch_size=batch_size,
        cache=cache,
        max_queries=max_queries,
        show_progress=True,  # a bar in a terminal, a line per 10 % in a log (moon.progress)
    )
    data_json = result.to_json()
    if out:
        paths = write_results(result, out, plots=not no_plots)
        click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
    if cache.directory is not None:
        click.echo(f"embedding cache {cache.directory}: {cache.hits} hit(s), {cache.misses} computed", err=True)
    if as_json:
        click.echo(json.dumps(data_json, indent=2, ensure_ascii=False))
    else:
        click.echo(markdown_table(data_json))


@eval_cmd.command("compare")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="FILE.md (table), FILE.json or FILE.png (bars).",
)
def compare(results, out) -> None:
    """Put several `moon eval` results side by side (main score per task; best in bold)."""
    from moon.bench.report import compare_table, load_results, write_comparison

    path = write_comparison(results, out)
    click.echo(compare_table([load_results(r) for r in results]))
    click.echo(f"wrote {path}", err=True)
