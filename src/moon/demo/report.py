"""The demo report: results against the baselines (and which checkpoint of each was scored),
Recall@k, a retrieval gallery, training health, the MoE routing map, image heat-maps, a 2-D map
of product vectors and every timing — as markdown and as one self-contained HTML page (images
inlined)."""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from moon.demo.stages import StageRecord
from moon.train.collapse import (
    COSINE_THRESHOLD,
    LEARNING_MARGIN,
    PATIENCE,
    RELAPSE_KEEP,
    RELAPSE_MIN_PEAK,
    RELAPSE_WINDOW,
    assess,
    record_chance,
    record_loss,
)

RETRIEVAL = ("text2product", "image2product", "multimodal2product", "product2product")


def _load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def headline_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns: the four retrieval tasks (Recall@10), mean classification accuracy, mean attribute
    accuracy. ``results``: model name → results.json content."""
    header = (
        ["model"]
        + [f"{t} R@10" for t in RETRIEVAL]
        + ["classification acc (mean of levels)", "attribute acc (mean of types)"]
    )
    rows = []
    for name, res in results.items():
        tasks = res["tasks"]
        cells = [name]
        for t in RETRIEVAL:
            m = tasks.get(t, {}).get("metrics", {})
            cells.append(f"{100 * m['recall@10']:.1f}" if m.get("recall@10") is not None else "–")  # None: no queries
        for prefix in ("classification-", "attribute-"):
            accs = [
                v["metrics"]["accuracy"]
                for k, v in tasks.items()
                if k.startswith(prefix) and v["metrics"].get("accuracy") is not None
            ]
            cells.append(f"{100 * float(np.mean(accs)):.1f}" if accs else "–")
        rows.append(cells)
    return header, rows


def _run_dir(rec: Any) -> Path:
    """A train stage's run directory (``outputs["run"]``; older records: the model's parent)."""
    return Path(rec.outputs.get("run") or Path(rec.outputs["model"]).parent)


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _warmup(run_dir: Path) -> int:
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        return int(cfg.get("optim", {}).get("warmup_steps", 0))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return 0


TRAINING_HEALTH_NOTE = (
    "Loss: the contrastive (InfoNCE) loss. Chance: that step's log(1 + negatives per query), the loss of a model that "
    "scores all candidates alike — it grows as the memory queue fills, so each window is compared with its own. "
    f"A step is collapsed when the mean cosine between its product vectors is ≥ {COSINE_THRESHOLD} (every product gets "
    f"almost the same vector), whatever the loss; a run has collapsed at the step ending {PATIENCE} collapsed steps in a "
    "row after the warm-up — the step the trainer warns at. Otherwise a run is learning when its last steps' loss is "
    f"≥ {LEARNING_MARGIN} below their chance level. A run has relapsed (learned, then fell back) at the step ending "
    f"{PATIENCE} steps in a row whose loss, averaged over {RELAPSE_WINDOW} steps, is at most {RELAPSE_KEEP:.0%} as far "
    f"below chance as at its best (when that best was ≥ {RELAPSE_MIN_PEAK} nats) — the trainer warns there too. "
    "Verdicts: collapsed (and still at the end), recovered, near collapse (collapsed at the end, but fewer steps than "
    "that), relapsed (and still down at the end), learning, at chance (moon.train.collapse; docs/training.md)."
)


def training_rows(trained: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per trained model from its run's ``metrics.jsonl``, judged by
    :func:`moon.train.collapse.assess` (the trainer's own definition of collapse): contrastive loss
    and that steps' chance level for the first and the last 5 logged steps, the last steps'
    product cosine, the steps the run collapsed and relapsed at, and the verdict (last column)."""
    header = [
        "model",
        "steps",
        "loss, first 5",
        "chance, first 5",
        "loss, last 5",
        "chance, last 5",
        "product cosine, last 5",
        "collapsed at step",
        "relapsed at step",
        "verdict",
    ]
    rows = []
    for name, rec in trained.items():
        run_dir = _run_dir(rec)
        h = assess(_metrics(run_dir), warmup=_warmup(run_dir))
        if h.verdict == "no data":
            continue
        cos = f"{h.last_cosine:.3f}" if math.isfinite(h.last_cosine) else "n/a"
        rows.append(
            [name, str(h.steps), f"{h.first_loss:.3f}", f"{h.first_chance:.3f}", f"{h.last_loss:.3f}",
             f"{h.last_chance:.3f}", cos, str(h.collapsed_at) if h.collapsed_at is not None else "–",
             str(h.relapsed_at) if h.relapsed_at is not None else "–", h.verdict]
        )  # fmt: skip
    return header, rows


def plot_training(trained: dict[str, Any], path: Path) -> Path | None:
    """Per trained model: loss and the per-step chance level (top), product cosine with the
    collapse threshold (bottom), collapsed steps shaded; ``None`` when no run logged anything."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moon.viz.axes import legend_below

    runs = []
    for name, rec in trained.items():
        run_dir = _run_dir(rec)
        recs = [r for r in _metrics(run_dir) if isinstance(r.get("loss"), (int, float))]
        if recs:
            runs.append((name, recs, _warmup(run_dir)))
    if not runs:
        return None
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 4.8), squeeze=False, sharex="col")
    for col, (name, recs, warmup) in enumerate(runs):
        steps = [r["step"] for r in recs]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(steps, [record_loss(r) for r in recs], color="#1f77b4", label="loss (contrastive)")
        top.plot(steps, [record_chance(r) for r in recs], color="black", ls="--", label="chance: log(1 + negatives)")
        top.set_title(name, fontsize=9)
        cos = [(r["step"], r["product_cosine"]) for r in recs if isinstance(r.get("product_cosine"), (int, float))]
        if cos:
            bottom.plot([s for s, _ in cos], [c for _, c in cos], color="#d62728", label="product cosine")
        bottom.axhline(COSINE_THRESHOLD, color="#d62728", ls=":", lw=1, label=f"collapse threshold {COSINE_THRESHOLD}")
        collapsed = [s for s, c in cos if s > warmup and c >= COSINE_THRESHOLD]
        for ax in (top, bottom):
            for s in collapsed:
                ax.axvspan(s - 0.5, s + 0.5, color="#d62728", alpha=0.08, lw=0)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        h = assess(recs, warmup=warmup)
        if h.collapsed_at is not None:
            for ax in (top, bottom):
                ax.axvline(h.collapsed_at, color="#d62728", lw=1)
            bottom.annotate(f"collapsed at step {h.collapsed_at}", (h.collapsed_at, 0.0), xycoords=("data", "axes fraction"),
                            fontsize=7, color="#d62728", ha="left", va="bottom", xytext=(3, 3), textcoords="offset points")  # fmt: skip
        if h.relapsed_at is not None:
            top.axvline(h.relapsed_at, color="#ff7f0e", lw=1)
            top.annotate(f"relapsed at step {h.relapsed_at}", (h.relapsed_at, 1.0), xycoords=("data", "axes fraction"),
                         fontsize=7, color="#ff7f0e", ha="left", va="top", xytext=(3, -3), textcoords="offset points")  # fmt: skip
        low = min(c for _, c in cos) if cos else 0.0
        bottom.set_ylim(min(low, COSINE_THRESHOLD) - 0.02 * (1 - min(low, 0.9)) - 0.005, 1.002)
        bottom.set_xlabel("step", fontsize=8)
    axes[0][0].set_ylabel("loss", fontsize=8)
    axes[1][0].set_ylabel("product cosine", fontsize=8)
    handles, labels = [], []
    for ax in (axes[0][0], axes[1][0]):
        hs, ls = ax.get_legend_handles_labels()
        handles += hs
        labels += ls
    shade = matplotlib.patches.Patch(color="#d62728", alpha=0.15, label="collapsed step")
    legend_below(fig, handles + [shade], labels + ["collapsed step"], ncol=5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def checkpoint_rows(trained: dict[str, Any], evaluated: dict[str, Any]) -> list[list[str]]:
    """Which checkpoint of each model was scored, and why: model, checkpoint, note."""
    rows = []
    for name, ev in evaluated.items():
        rec = trained.get(name)
        if rec is None:
            rows.append([name, "as built", "not trained (the floor)"])
            continue
        ck = ev.outputs.get("checkpoint") or rec.outputs.get("checkpoint") or {}
        which = ck.get("name") or Path(ev.outputs.get("model") or rec.outputs["model"]).name
        steps = ck.get("steps")
        if which == "best" and ck.get("step") is not None:
            val = ck.get("val_recall@10")
            note = (
                f"best validation Recall@10 ({100 * val:.1f} %) at step {ck['step']} of {steps}"
                if val is not None
                else ""
            )
            hit = ck.get("val_hit@10")
            if hit is not None:
                note += f"; hit@10 {100 * hit:.1f} %"
            finals = ck.get("final_val_recall@10")
            if finals is not None:
                note += f"; the last validation (step {ck.get('final_val_step')}) gave {100 * finals:.1f} %"
            rows.append([name, f"best/ (step {ck['step']})", note])
        else:
            rows.append([name, f"{which}/", ck.get("why") or "the last step (the train stage predates best/ hand-off)"])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _curve(task: dict[str, Any]) -> dict[int, float]:
    """Recall@k by k: the whole curve (k = 1…100) when results.json has it, else Recall@1/5/10."""
    if task.get("recall_curve"):
        return {int(k): float(v) for k, v in task["recall_curve"].items()}
    m = task.get("metrics", {})
    return {k: float(m[f"recall@{k}"]) for k in (1, 5, 10) if m.get(f"recall@{k}") is not None}


def plot_recall_at_k(results: dict[str, dict[str, Any]], path: Path) -> tuple[Path, str]:
    """One panel per retrieval task, one line per model (the ``random`` floor dashed grey), a
    shared y-axis scaled to the data — log when the values span ≥ 20× — and the legend under the
    panels. Returns the PNG and a one-line caption saying how to read the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moon.viz.axes import fit_y, legend_below

    tasks = [t for t in RETRIEVAL if any(t in r["tasks"] for r in results.values())]
    values = [v for r in results.values() for t in tasks if t in r["tasks"] for v in _curve(r["tasks"][t]).values()]
    scale = fit_y(values)
    n = max(1, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, task in zip(axes[0], tasks, strict=False):
        n_queries = None
        for i, (name, res) in enumerate(results.items()):
            t = res["tasks"].get(task)
            if not t:
                continue
            n_queries = t.get("n_queries", n_queries)
            curve = _curve(t)
            ks = sorted(curve)
            floor = name.split()[0].lower() == "random"
            ax.plot(
                ks, scale.place(curve[k] for k in ks), label=name, marker="o" if len(ks) <= 3 else None, lw=1.6,
                ms=3, color="#888888" if floor else colours(i), ls="--" if floor else "-", zorder=2 if floor else 3,
            )  # fmt: skip
        ax.set_title(f"{task}" + (f" (n={n_queries})" if n_queries is not None else ""), fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("k", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
    scale.apply(axes[0][0])
    axes[0][0].set_ylabel("Recall@k", fontsize=8)
    legend_below(fig, *axes[0][0].get_legend_handles_labels(), ncol=min(4, len(results)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    caption = "Recall@k against k (log scale) for every test query of the task; n = queries."
    if scale.kind == "log":
        caption += " The y-axis is logarithmic (the values span more than 20×); a 0 is drawn on the bottom edge."
    else:
        caption += f" The y-axis ends at {100 * scale.top:.0f} %, just above the largest value."
    return path, caption


GALLERY_TASKS = ("image2product", "text2product", "multimodal2product")


def _same_top5_summary(rankings: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per task: how many distinct top-5 lists the model gave, and how many queries share the
    most common one (a model that returns the same 5 products for everything has collapsed)."""
    lines = []
    for task in GALLERY_TASKS:
        rows = rankings.get(task) or []
        if not rows:
            continue
        tops = Counter(tuple(r["ranked_product_ids"][:5]) for r in rows)
        common, count = tops.most_common(1)[0]
        line = f"{task}: {len(tops)} distinct top-5 lists for {len(rows)} queries"
        if count > 1:
            line += f"; the most common one is returned for {count} of them"
        lines.append(line)
    return lines


def _gallery(store_dir: str, eval_dir: Path, crop_source: str | None, n: int = 2) -> tuple[str, list[str]]:
    """``n`` test queries per query task (seeded), each with the product it was bought with and
    the model's top 5, hits marked; a query whose top 5 another query also got says so. When no
    sampled query of a task has a hit but some query does, one sampled query is swapped for a
    query with a hit (and labelled so). Returns the HTML and the same-top-5 summary lines."""
    from moon.data import ProductStore
    from moon.viz.gallery import GalleryRow, retrieval_gallery_html

    store = ProductStore(store_dir, crop_source=crop_source)
    positives = store.positives("test")
    queries = {q.id: q for q in store.queries("test")}
    rankings: dict[str, list[dict[str, Any]]] = {}
    with open(eval_dir / "rankings.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["task"] in GALLERY_TASKS and row["query_id"] in queries:
                rankings.setdefault(row["task"], []).append(row)
    summary = _same_top5_summary(rankings)
    rng = random.Random(0)
    rows = []
    for task in GALLERY_TASKS:
        items = rankings.get(task) or []
        if not items:
            continue
        top5_of = Counter(tuple(r["ranked_product_ids"][:5]) for r in items)

        def hit(r: dict[str, Any]) -> bool:
            return bool(set(r["ranked_product_ids"][:5]) & positives.get(r["query_id"], set()))

        picked = rng.sample(items, min(n, len(items)))
        labels = ["" for _ in picked]
        if not any(hit(r) for r in picked):
            with_hit = [r for r in items if hit(r) and r not in picked]
            if with_hit:
                picked[-1], labels[-1] = rng.choice(with_hit), " (picked: a query with a hit)"
        for row, extra in zip(picked, labels, strict=True):
            q = queries[row["query_id"]]
            bought = positives.get(q.id, set())
            ranked = row["ranked_product_ids"]
            results = []
            for pid in ranked[:5]:
                p = store.product(pid)
                results.append((p.images[0] if p.images else None, p.title, None, pid in bought))
            scores = row.get("scores")
            if scores:
                results = [(a, b, float(s), d) for (a, b, _, d), s in zip(results, scores, strict=False)]
            purchased = []
            for pid in sorted(bought)[:2]:
                p = store.product(pid)
                where = f"rank {ranked.index(pid) + 1}" if pid in ranked else f"not in top {len(ranked)}"
                purchased.append((p.images[0] if p.images else None, p.title, where))
            same = top5_of[tuple(ranked[:5])] - 1
            note = f"the same top 5 as {same} other {task} quer{'y' if same == 1 else 'ies'}" if same else ""
            rows.append(
                GalleryRow(q.text, q.images[0] if q.images else None, f"{task}{extra}", results, purchased, note)
            )
    return retrieval_gallery_html(rows), summary


HEATMAP_NOTE = (
    "Method: for each vision patch (a merged 28×28-pixel patch), |Σ gradient × input| of the product vector's length "
    "along its own direction (MoonEmbedder.explain_product), divided by the image's largest value — so colours compare "
    "patches within one image, not across images. Crops are not shown."
)


def _model_pictures(model_dir: str, store_dir: str, out: Path) -> dict[str, Any]:
    """Routing map, heat-maps and the embedding map for a trained MOON model."""
    from moon.data import ProductStore, load_image
    from moon.models import load_embedder
    from moon.viz import plot_embedding_map, plot_heatmaps, plot_routing_map

    pics: dict[str, Any] = {}
    emb = load_embedder(model_dir)
    store = ProductStore(store_dir, crop_source="learned")
    products = store.products()
    rng = random.Random(0)
    sample = rng.sample(products, min(300, len(products)))
    if hasattr(emb, "routing_stats"):
        emb.routing_stats(reset=True)
    vecs = emb.encode_products(sample, batch_size=16, show_progress=True)
    labels = [" > ".join(p.category[:2]) if p.category else "?" for p in sample]
    what = "All" if len(sample) == len(products) else f"A random {len(sample)} of the"
    pics["embedding_map_caption"] = (
        f"{what} {len(products)} products of the store (every split; the catalogue is shared), t-SNE of their "
        "vectors, coloured by the first two category levels (the 12 most common; the rest grey)."
    )
    pics["embedding_map"] = plot_embedding_map(
        vecs,
        labels,
        out / "embedding_map.png",
        title=f"MOON product vectors: {len(sample)} of {len(products)} products",
    )
    if hasattr(emb, "routing_stats"):
        stats = emb.routing_stats(reset=True)
        if stats:
            first = next(iter(stats.values()))
            layers = {f"layer {k}": np.asarray(v["counts"]) for k, v in stats.items()}
            pics["routing_map"] = plot_routing_map(layers, first["aspects"], first["experts"], out / "routing_map.png")
    if hasattr(emb, "explain_product"):
        panels = []
        for p in [p for p in sample if len(p.images) >= 2][:4]:
            maps = emb.explain_product(p)
            for img_path, heat in zip(p.images[:2], maps[:2], strict=False):
                panels.append((load_image(img_path).resize((224, 224)), heat, p.title))
        if panels:
            pics["heatmaps"] = plot_heatmaps(panels, out / "heatmaps.png", cols=4)
    return pics


def _img_tag(path: str | Path, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    w = f" width='{width}'" if width else ""
    return f"<img src='data:image/png;base64,{data}'{w} alt=''>"


def _table_html(h: list[str], rs: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in h)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rs)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def timing_rows(records: list[StageRecord], report_seconds: float) -> list[list[str]]:
    """Every stage (a cached one with the time it took when it ran), the report itself, and the
    totals: this run's wall time (work done now) and what everything took when it ran."""
    rows = [[r.name, f"{r.seconds:.1f}", "yes" if r.cached else ""] for r in records]
    rows.append(["report (pictures, gallery, this page)", f"{report_seconds:.1f}", ""])
    now = sum(r.seconds for r in records if not r.cached) + report_seconds
    rows.append(["total, this run", f"{now:.1f}", ""])
    if any(r.cached for r in records):
        rows.append(["total, every stage as it ran", f"{sum(r.seconds for r in records) + report_seconds:.1f}", ""])
    return rows


def write_report(
    out: Path,
    cfg: Any,
    records: list[StageRecord],
    world: StageRecord,
    detector: StageRecord,
    trained: dict[str, StageRecord],
    evaluated: dict[str, StageRecord],
) -> Path:
    """Write ``out/report.md`` and ``out/report.html`` (pictures under ``out/report_assets``);
    returns the HTML path."""
    t0 = time.perf_counter()
    out = Path(out)
    assets = out / "report_assets"
    assets.mkdir(exist_ok=True)
    results = {name: _load(rec.outputs["results"]) for name, rec in evaluated.items()}
    header, rows = headline_rows(results)
    recall_png, recall_caption = plot_recall_at_k(results, assets / "recall_at_k.png")
    store_dir = world.outputs["store"]
    first_name = next(iter(evaluated))
    first_eval = Path(evaluated[first_name].outputs["results"]).parent
    gallery_html, same_top5 = _gallery(
        store_dir, first_eval, "learned" if evaluated[first_name].outputs.get("crops") else None
    )
    # the pictures show the checkpoint that was scored
    moon_model = next(
        (evaluated[name].outputs.get("model") or rec.outputs["model"] for name, rec in trained.items()
         if name.startswith("MOON") and name in evaluated),
        None,
    )  # fmt: skip
    pics = _model_pictures(moon_model, store_dir, assets) if moon_model else {}
    train_png = plot_training(trained, assets / "training.png")
    det_eval = detector.outputs.get("eval", {})
    stats = world.outputs.get("stats", {})
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}"
    intro = (
        f"Machine: {machine}. World: {stats.get('products')} products, {stats.get('queries')} queries "
        f"({stats.get('category_levels')} category levels, {len(stats.get('attribute_types', {}))} attribute types). "
        f"Every trained model: {cfg.steps} steps × batch {cfg.batch_size} on the same train split."
    )
    ck_header = ["model", "checkpoint scored", "why"]
    ck_rows = checkpoint_rows(trained, evaluated)
    train_header, train_rows = training_rows(trained)
    det_header = ["detector", "kind", "mean IoU", "hit@0.5", "ms/image"]
    det_rows = [
        [name, kind, f"{m.get('mean_iou', float('nan')):.3f}", f"{m.get('hit_rate', float('nan')):.3f}",
         f"{m.get('ms_per_image', float('nan')):.1f}"]
        for name, ev in det_eval.items()
        for kind, m in (ev.get("kinds") or {}).items()
    ]  # fmt: skip
    gallery_note = (
        f"Test queries of {first_name}: the product each was bought with (dashed blue, with where {first_name} ranked "
        "it), then its top 5; green ✔ = a purchased product."
    )
    timing_header = ["stage", "seconds", "cached"]
    timings = timing_rows(records, time.perf_counter() - t0)  # everything but writing the two files

    md = ["# MOON demo report", "", intro, "", "## Results (test split, %)", "", markdown_table(header, rows), ""]
    md += ["Scored checkpoints:", "", markdown_table(ck_header, ck_rows), ""]
    md += ["![Recall@k](report_assets/recall_at_k.png)", "", recall_caption, ""]
    md += ["## Retrieval gallery", "", gallery_note + " The gallery itself is in report.html."]
    md += ["", *[f"* {line}" for line in same_top5]]
    if train_rows:
        md += ["", "## Training health", "", markdown_table(train_header, train_rows), "", TRAINING_HEALTH_NOTE]
        if train_png:
            md += ["", "![training](report_assets/training.png)"]
    if pics.get("routing_map"):
        md += ["", "## MoE routing map", "", "![routing](report_assets/routing_map.png)"]
    if pics.get("heatmaps"):
        md += ["", "## What the product vector draws on (heat-maps)", "", HEATMAP_NOTE, ""]
        md += ["![heat-maps](report_assets/heatmaps.png)"]
    if pics.get("embedding_map"):
        md += [
            "",
            "## Product vectors in 2-D",
            "",
            pics["embedding_map_caption"],
            "",
            "![map](report_assets/embedding_map.png)",
        ]
    md += ["", "## Core region detection (test images)", "", markdown_table(det_header, det_rows)]
    md += ["", "## Timings", "", markdown_table(timing_header, timings)]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>MOON demo report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:20px auto;padding:0 16px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
        "th{background:#f2f2f7}h2{margin-top:32px;border-bottom:1px solid #ddd}img{max-width:100%}"
        "p.note{font-size:13px;color:#444;max-width:1000px}ul.note{font-size:13px;color:#444}</style></head><body>",
        "<h1>MOON demo report</h1>",
        f"<p>{html.escape(intro)}</p>",
        "<h2>Results (test split, %)</h2>",
        _table_html(header, rows),
        "<p class='note'>Scored checkpoints:</p>",
        _table_html(ck_header, ck_rows),
        _img_tag(recall_png),
        f"<p class='note'>{html.escape(recall_caption)}</p>",
        f"<h2>Retrieval gallery</h2><p class='note'>{html.escape(gallery_note)}</p>",
        "<ul class='note'>" + "".join(f"<li>{html.escape(line)}</li>" for line in same_top5) + "</ul>",
        gallery_html,
    ]
    if train_rows:
        parts += ["<h2>Training health</h2>", _table_html(train_header, train_rows)]
        parts.append(f"<p class='note'>{html.escape(TRAINING_HEALTH_NOTE)}</p>")
        if train_png:
            parts.append(_img_tag(train_png))
    if pics.get("routing_map"):
        parts += ["<h2>MoE routing map</h2>", _img_tag(pics["routing_map"])]
    if pics.get("heatmaps"):
        parts += ["<h2>What the product vector draws on</h2>", f"<p class='note'>{html.escape(HEATMAP_NOTE)}</p>"]
        parts.append(_img_tag(pics["heatmaps"]))
    if pics.get("embedding_map"):
        parts += [
            "<h2>Product vectors in 2-D</h2>",
            f"<p class='note'>{html.escape(pics['embedding_map_caption'])}</p>",
        ]
        parts.append(_img_tag(pics["embedding_map"]))
    parts += [
        "<h2>Core region detection (test images)</h2>",
        _table_html(det_header, det_rows),
        "<h2>Timings</h2>",
        _table_html(timing_header, timings),
        "</body></html>",
    ]
    (out / "report.html").write_text("".join(parts), encoding="utf-8")
    return out / "report.html"
