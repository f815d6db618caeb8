"""PNG plots of benchmark results (matplotlib, Agg backend).

* ``recall_curves.png``       Recall@k against k, one line per retrieval task;
* ``level_accuracy.png``      accuracy and macro-F1 bars per category level;
* ``attribute_confusion.png`` one confusion matrix per attribute task (most frequent values);
* :func:`plot_comparison`     main scores of several models, grouped bars per task.

Every y-axis is scaled to its data (log when the values span ≥ 20×), and legends sit under the
axes, where they cover nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moon.bench.runner import EvalResult, TaskResult  # noqa: E402
from moon.viz.axes import fit_y, legend_below  # noqa: E402

MAX_CONFUSION_VALUES = 12


def plot_recall_curves(tasks: Sequence[TaskResult], path: Path, title: str) -> None:
    scale = fit_y([v for t in tasks for v in t.curve.values()])
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for t in tasks:
        ks = sorted(t.curve)
        ax.plot(ks, scale.place(t.curve[k] for k in ks), marker="o", label=f"{t.spec.name} (n={t.n_queries})")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k" + (" (log scale; 0 on the bottom edge)" if scale.kind == "log" else ""))
    scale.apply(ax)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    legend_below(fig, *ax.get_legend_handles_labels(), ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_level_accuracy(tasks: Sequence[TaskResult], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.4))
    x = np.arange(len(tasks))
    acc = [t.metrics["accuracy"] or 0.0 for t in tasks]
    f1 = [t.metrics["macro_f1"] or 0.0 for t in tasks]
    ax.bar(x - 0.2, acc, 0.4, label="accuracy")
    ax.bar(x + 0.2, f1, 0.4, label="macro-F1")
    chance = [1.0 / t.n_candidates if t.n_candidates else 0.0 for t in tasks]
    ax.scatter(x, chance, color="black", marker="_", s=400, label="1 / #labels", zorder=3)
    ax.set_xticks(x, [f"L{t.spec.level}\n({t.n_candidates} labels)" for t in tasks], fontsize=8)
    fit_y(acc + f1 + chance, log=False).apply(ax)
    ax.set_title(title)
    legend_below(fig, *ax.get_legend_handles_labels(), ncol=3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], max_values: int) -> tuple[list[str], np.ndarray]:
    """The ``max_values`` most frequent true labels (+ ``other``) and the counts (rows: truth, cols: prediction)."""
    top = [v for v, _ in Counter(y_true).most_common(max_values)]
    labels = top + (["other"] if len(set(y_true) | set(y_pred)) > len(top) else [])
    pos = {v: i for i, v in enumerate(top)}
    other = len(top)
    mat = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        mat[pos.get(t, other), pos.get(p, other)] += 1
    return labels, mat


def plot_attribute_confusion(tasks: Sequence[TaskResult], path: Path, title: str) -> None:
    n = len(tasks)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, t in zip(axes.flat, tasks, strict=False):
        prefix = f"{t.spec.attribute}: "
        labels, mat = confusion_matrix(t.y_true, t.y_pred, MAX_CONFUSION_VALUES)
        short = [label[len(prefix) :] if label.startswith(prefix) else label for label in labels]
        norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(short)), short, rotation=90, fontsize=6)
        ax.set_yticks(range(len(short)), short, fontsize=6)
        acc = t.metrics["accuracy"]
        ax.set_title(f"{t.spec.attribute} (acc {100 * (acc or 0):.1f}%)", fontsize=9)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: EvalResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every plot the result has tasks for; returns ``{name: path}``."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    retrieval = [t for t in result.tasks if t.spec.kind == "retrieval" and t.curve]
    levels = [t for t in result.tasks if t.spec.kind == "classification"]
    attributes = [t for t in result.tasks if t.spec.kind == "attribute" and t.y_true]
    if retrieval:
        written["recall_curves"] = out / "recall_curves.png"
        plot_recall_curves(retrieval, written["recall_curves"], f"{result.model}: retrieval")
    if levels:
        written["level_accuracy"] = out / "level_accuracy.png"
        plot_level_accuracy(levels, written["level_accuracy"], f"{result.model}: category levels")
    if attributes:
        written["attribute_confusion"] = out / "attribute_confusion.png"
        plot_attribute_confusion(attributes, written["attribute_confusion"], f"{result.model}: attributes")
    return written


def plot_comparison(results: Sequence[dict[str, Any]], names: Sequence[str], path: Path) -> None:
    """Grouped bars: main score per task (x), one bar per model."""
    tasks: list[str] = []
    for r in results:
        tasks += [t for t in r["tasks"] if t not in tasks]
    x = np.arange(len(tasks))
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(tasks) + 2), 4.6))
    every: list[float] = []
    for i, (r, name) in enumerate(zip(results, names, strict=True)):
        scores = [(r["tasks"].get(t) or {}).get("main_score") or 0.0 for t in tasks]
        every += scores
        ax.bar(x + (i - (len(results) - 1) / 2) * width, scores, width, label=name)
    ax.set_xticks(x, tasks, rotation=45, ha="right", fontsize=7)
    fit_y(every, log=False).apply(ax)
    ax.set_ylabel("main score")
    legend_below(fig, *ax.get_legend_handles_labels())
    fig.savefig(path, dpi=110)
    plt.close(fig)
