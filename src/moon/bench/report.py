"""Write and compare benchmark results: results.json, rankings.jsonl, a markdown table, plots.

Layout of an output directory written by :func:`write_results`::

    OUT/results.json      {"model", "fingerprint", "data", "split", "tasks": {TASK: {"metrics", "main_score", ...}}}
    OUT/rankings.jsonl    one row per task and query: task, query_id, ranked_product_ids + relevant_product_ids
                          (or ranked_labels + labels)
    OUT/results.md        the metrics as a markdown table
    OUT/recall_curves.png, OUT/level_accuracy.png, OUT/attribute_confusion.png   (when the tasks exist)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moon.bench.runner import EvalResult
from moon.errors import DataError

RESULTS_FILE = "results.json"
RANKINGS_FILE = "rankings.jsonl"
TABLE_FILE = "results.md"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per task: every metric of the task (in %), the main score and the query count."""
    columns = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "accuracy", "macro_f1"]
    lines = [
        f"**{results['model']}** on `{results.get('data', '?')}` (split {results.get('split', '?')}), metrics in %",
        "",
        "| task | " + " | ".join(columns) + " | main | n |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for name, task in results["tasks"].items():
        m = task["metrics"]
        cells = [_pct(m[c]) if c in m else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(task['main_score'])} | {task['n_queries']} |")
    return "\n".join(lines) + "\n"


def write_results(result: EvalResult, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write results.json, rankings.jsonl, results.md and (optionally) the PNG plots; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    paths = {"results": out / RESULTS_FILE, "rankings": out / RANKINGS_FILE, "table": out / TABLE_FILE}
    paths["results"].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(paths["rankings"], "w", encoding="utf-8") as fh:
        for task in result.tasks:
            for row in task.ranking_rows():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths["table"].write_text(markdown_table(data), encoding="utf-8")
    if plots:
        from moon.bench.plots import write_plots

        paths.update(write_plots(result, out))
    return paths


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results.json (given the file or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.is_file():
        raise DataError(f"{path}: no {RESULTS_FILE} here (run `moon eval --out DIR` first)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: unreadable results ({exc})") from exc
    if not isinstance(data, dict) or "tasks" not in data or "model" not in data:
        raise DataError(f"{p}: not a moon eval results file (no 'model'/'tasks')")
    return data


def _unique_names(results: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results:
        name, n = str(r["model"]), 2
        while name in names:
            name, n = f"{r['model']} ({n})", n + 1
        names.append(name)
    return names


def compare_table(results: Sequence[dict[str, Any]]) -> str:
    """Models side by side: one row per task (main score, %), one column per model; best in bold."""
    names = _unique_names(results)
    tasks: list[str] = []
    for r in results:
        tasks += [t for t in r["tasks"] if t not in tasks]
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task in tasks:
        entries = [r["tasks"].get(task) for r in results]
        scores = [e["main_score"] if e else None for e in entries]
        metric = next((e.get("main_metric", "main") for e in entries if e), "main")
        best = max((s for s in scores if s is not None), default=None)
        cells = [
            ("**" + _pct(s) + "**" if s is not None and s == best and len(results) > 1 else _pct(s)) for s in scores
        ]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(result_paths: Sequence[str | os.PathLike], out_file: str | os.PathLike) -> Path:
    """Compare several results directories; ``out_file`` ending in .json, .png or anything else (markdown)."""
    results = [load_results(p) for p in result_paths]
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        names = _unique_names(results)
        table = {n: {t: v["main_score"] for t, v in r["tasks"].items()} for n, r in zip(names, results, strict=True)}
        out.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    elif out.suffix == ".png":
        from moon.bench.plots import plot_comparison

        plot_comparison(results, _unique_names(results), out)
    else:
        out.write_text(compare_table(results), encoding="utf-8")
    return out
