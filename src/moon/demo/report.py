"""The demo report: results against the baselines, Recall@k, a retrieval gallery, the MoE routing
map, image heat-maps, a 2-D map of product vectors and stage timings — as markdown and as one
self-contained HTML page (images inlined)."""

from __future__ import annotations

import base64
import html
import json
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np

from moon.demo.stages import StageRecord

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
            cells.append(f"{100 * m['recall@10']:.1f}" if "recall@10" in m else "–")
        for prefix in ("classification-", "attribute-"):
            accs = [
                v["metrics"]["accuracy"]
                for k, v in tasks.items()
                if k.startswith(prefix) and "accuracy" in v["metrics"]
            ]
            cells.append(f"{100 * float(np.mean(accs)):.1f}" if accs else "–")
        rows.append(cells)
    return header, rows


def training_rows(trained: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per trained model from its run's ``metrics.jsonl``: mean loss of the first and last 5
    logged steps, the chance loss ``log(1 + negatives per query)`` and the last steps' product cosine
    (near 1 = collapsed embeddings, see docs/training.md)."""
    import json
    import math

    header = ["model", "loss, first 5 steps", "loss, last 5 steps", "chance loss", "product cosine, last 5", "verdict"]
    rows = []
    for name, rec in trained.items():
        path = Path(rec.outputs["model"]).parent / "metrics.jsonl"
        if not path.is_file():
            continue
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        recs = [r for r in recs if "loss" in r]
        if not recs:
            continue
        first, last = recs[:5], recs[-5:]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        chance = math.log(1 + mean([r["negatives_per_query"] for r in last]))
        end = mean([r["loss"] for r in last])
        cos = [r["product_cosine"] for r in last if "product_cosine" in r]
        cos_v = mean(cos) if cos else float("nan")
        if cos and cos_v >= 0.99:
            verdict = "collapsed"
        elif end < chance - 0.1:
            verdict = "learning"
        else:
            verdict = "at chance"
        rows.append(
            [name, f"{mean([r['loss'] for r in first]):.3f}", f"{end:.3f}", f"{chance:.3f}",
             f"{cos_v:.3f}" if cos else "n/a", verdict]
        )  # fmt: skip
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plot_recall_at_k(results: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in RETRIEVAL if any(t in r["tasks"] for r in results.values())]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.4 * max(1, len(tasks)), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        for name, res in results.items():
            m = res["tasks"].get(task, {}).get("metrics", {})
            ks = [k for k in (1, 5, 10) if f"recall@{k}" in m]
            if ks:
                ax.plot(ks, [m[f"recall@{k}"] for k in ks], marker="o", label=name)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("k")
        ax.set_ylim(0, 1)
        ax.set_xticks([1, 5, 10])
    axes[0][0].set_ylabel("Recall@k")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _gallery(store_dir: str, eval_dir: Path, crop_source: str | None, n: int = 6) -> str:
    """Image→product and text→product queries of the first model with their top 5, hits marked."""
    from moon.data import ProductStore
    from moon.viz.gallery import GalleryRow, retrieval_gallery_html

    store = ProductStore(store_dir, crop_source=crop_source)
    positives = store.positives("test")
    queries = {q.id: q for q in store.queries("test")}
    rankings: dict[str, list[dict[str, Any]]] = {}
    with open(eval_dir / "rankings.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["task"] in ("image2product", "text2product", "multimodal2product"):
                rankings.setdefault(row["task"], []).append(row)
    rng = random.Random(0)
    rows = []
    for task, items in sorted(rankings.items()):
        for row in rng.sample(items, min(n // 3 or 1, len(items))):
            q = queries.get(row["query_id"])
            if q is None:
                continue
            results = []
            for pid in row["ranked_product_ids"][:5]:
                p = store.product(pid)
                results.append((p.images[0] if p.images else None, p.title, None, pid in positives.get(q.id, set())))
            scores = row.get("scores")
            if scores:
                results = [(a, b, float(s), d) for (a, b, _, d), s in zip(results, scores, strict=False)]
            rows.append(GalleryRow(q.text, q.images[0] if q.images else None, f"{task} · {q.id}", results))
    return retrieval_gallery_html(rows)


def _model_pictures(model_dir: str, store_dir: str, out: Path) -> dict[str, Any]:
    """Routing map, heat-maps and the embedding map for a trained MOON model."""
    from moon.data import ProductStore, load_image
    from moon.embedders import load_embedder
    from moon.viz import overlay_heatmap, plot_embedding_map, plot_routing_map

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
    pics["embedding_map"] = plot_embedding_map(
        vecs, labels, out / "embedding_map.png", title="MOON product vectors (test sample), by category"
    )
    if hasattr(emb, "routing_stats"):
        stats = emb.routing_stats(reset=True)
        if stats:
            first = next(iter(stats.values()))
            layers = {f"layer {k}": np.asarray(v["counts"]) for k, v in stats.items()}
            pics["routing_map"] = plot_routing_map(layers, first["aspects"], first["experts"], out / "routing_map.png")
    if hasattr(emb, "explain_product"):
        heat_files = []
        for i, p in enumerate([p for p in sample if len(p.images) >= 2][:4]):
            maps = emb.explain_product(p)
            for j, (img_path, heat) in enumerate(zip(p.images[:2], maps[:2], strict=False)):
                f = out / f"heat_{i}_{j}.png"
                overlay_heatmap(load_image(img_path).resize((224, 224)), heat).save(f)
                heat_files.append((str(f), p.title))
        pics["heatmaps"] = heat_files
    return pics


def _img_tag(path: str | Path, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    w = f" width='{width}'" if width else ""
    return f"<img src='data:image/png;base64,{data}'{w} alt=''>"


def write_report(
    out: Path,
    cfg: Any,
    records: list[StageRecord],
    world: StageRecord,
    detector: StageRecord,
    trained: dict[str, StageRecord],
    evaluated: dict[str, StageRecord],
) -> Path:
    out = Path(out)
    assets = out / "report_assets"
    assets.mkdir(exist_ok=True)
    results = {name: _load(rec.outputs["results"]) for name, rec in evaluated.items()}
    header, rows = headline_rows(results)
    table_md = markdown_table(header, rows)
    recall_png = _plot_recall_at_k(results, assets / "recall_at_k.png")
    store_dir = world.outputs["store"]
    first_name = next(iter(evaluated))
    first_eval = Path(evaluated[first_name].outputs["results"]).parent
    gallery_html = _gallery(store_dir, first_eval, "learned" if evaluated[first_name].outputs.get("crops") else None)
    moon_model = next((rec.outputs["model"] for name, rec in trained.items() if name.startswith("MOON")), None)
    pics = _model_pictures(moon_model, store_dir, assets) if moon_model else {}
    det_eval = detector.outputs.get("eval", {})
    stats = world.outputs.get("stats", {})
    timings = [(r.name, r.seconds, r.cached) for r in records]
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}"

    md = [
        "# MOON demo report",
        "",
        f"Machine: {machine}. World: {stats.get('products')} products, {stats.get('queries')} queries "
        f"({stats.get('category_levels')} category levels, {len(stats.get('attribute_types', {}))} attribute types). "
        f"Every trained model: {cfg.steps} steps × batch {cfg.batch_size} on the same train split.",
        "",
        "## Results (test split, %)",
        "",
        table_md,
        "",
        "![Recall@k](report_assets/recall_at_k.png)",
        "",
        "## Core region detection (test images)",
        "",
        "| detector | kind | mean IoU | hit@0.5 | ms/image |",
        "|---|---|---|---|---|",
    ]
    for name, ev in det_eval.items():
        for kind, m in (ev.get("kinds") or {}).items():
            md.append(
                f"| {name} | {kind} | {m.get('mean_iou', float('nan')):.3f} | {m.get('hit_rate', float('nan')):.3f} | {m.get('ms_per_image', float('nan')):.1f} |"
            )
    train_header, train_rows = training_rows(trained)
    if train_rows:
        md += ["", "## Training health", "", markdown_table(train_header, train_rows)]
    md += ["", "## Stage timings", "", "| stage | seconds | cached |", "|---|---|---|"]
    md += [f"| {n} | {s:.1f} | {'yes' if c else ''} |" for n, s, c in timings]
    if pics.get("routing_map"):
        md += ["", "## MoE routing map", "", "![routing](report_assets/routing_map.png)"]
    if pics.get("embedding_map"):
        md += ["", "## Product vectors in 2-D", "", "![map](report_assets/embedding_map.png)"]
    if pics.get("heatmaps"):
        md += ["", "## What the product vector draws on (heat-maps)", ""]
        md += [f"![{html.escape(t)}]({Path(f).relative_to(out).as_posix()})" for f, t in pics["heatmaps"]]
    md += ["", "The retrieval gallery is in report.html."]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    def table_html(h: list[str], rs: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in h)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rs)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    det_rows = [
        [name, kind, f"{m.get('mean_iou', 0):.3f}", f"{m.get('hit_rate', 0):.3f}", f"{m.get('ms_per_image', 0):.1f}"]
        for name, ev in det_eval.items()
        for kind, m in (ev.get("kinds") or {}).items()
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>MOON demo report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:20px auto;padding:0 16px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
        "th{background:#f2f2f7}h2{margin-top:32px;border-bottom:1px solid #ddd}img{max-width:100%}"
        ".heat{display:inline-block;margin:4px;text-align:center;font-size:11px;width:230px}</style></head><body>",
        "<h1>MOON demo report</h1>",
        f"<p>{html.escape(md[2])}</p>",
        "<h2>Results (test split, %)</h2>",
        table_html(header, rows),
        _img_tag(recall_png),
        "<h2>Retrieval gallery</h2><p>Test queries of the first model with its top 5 results; green = purchased.</p>",
        gallery_html,
    ]
    if pics.get("routing_map"):
        parts += ["<h2>MoE routing map</h2>", _img_tag(pics["routing_map"])]
    if pics.get("heatmaps"):
        parts.append("<h2>What the product vector draws on</h2><div>")
        parts += [f"<div class='heat'>{_img_tag(f, 224)}<br>{html.escape(t[:60])}</div>" for f, t in pics["heatmaps"]]
        parts.append("</div>")
    if pics.get("embedding_map"):
        parts += ["<h2>Product vectors in 2-D</h2>", _img_tag(pics["embedding_map"])]
    if train_rows:
        parts += [
            "<h2>Training health</h2><p>Loss against chance, and the mean cosine between a step's product "
            "vectors (near 1 = every product gets almost the same vector: collapsed, see docs/training.md).</p>",
            table_html(train_header, train_rows),
        ]
    parts += [
        "<h2>Core region detection (test images)</h2>",
        table_html(["detector", "kind", "mean IoU", "hit@0.5", "ms/image"], det_rows),
        "<h2>Stage timings</h2>",
        table_html(["stage", "seconds", "cached"], [[n, f"{s:.1f}", "yes" if c else ""] for n, s, c in timings]),
        "</body></html>",
    ]
    (out / "report.html").write_text("".join(parts), encoding="utf-8")
    return out / "report.html"
