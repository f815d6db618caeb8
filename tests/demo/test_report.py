"""The demo report's parts: the Recall@k plot's axes, the gallery, which checkpoint was scored,
training health and the timing table."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from PIL import Image

from moon.data import Product, Purchase, Query, write_store
from moon.demo.pipeline import scored_checkpoint
from moon.demo.report import (
    _gallery,
    checkpoint_rows,
    plot_recall_at_k,
    plot_training,
    timing_rows,
    training_rows,
)
from moon.demo.stages import StageRecord


def _results(r_at_10: float, curve: dict[int, float] | None = None) -> dict:
    task = {"metrics": {"recall@1": r_at_10 / 2, "recall@5": r_at_10 * 0.8, "recall@10": r_at_10}, "n_queries": 20}
    if curve:
        task["recall_curve"] = {str(k): v for k, v in curve.items()}
    return {"tasks": {"text2product": task}}


def test_recall_plot_goes_log_when_one_model_is_far_ahead(tmp_path):
    results = {
        "MOON": _results(0.02, {1: 0.0, 5: 0.01, 10: 0.02, 100: 0.2}),
        "towers": _results(0.9, {1: 0.5, 5: 0.8, 10: 0.9, 100: 1.0}),
        "random": _results(0.03),
    }
    path, caption = plot_recall_at_k(results, tmp_path / "r.png")
    assert Image.open(path).size[0] > 200
    assert "logarithmic" in caption and "bottom edge" in caption
    _, caption = plot_recall_at_k({"a": _results(0.3), "b": _results(0.2)}, tmp_path / "s.png")
    assert "ends at 38 %" in caption  # 1.25 × 30 %: the data fill the axis


def _store(root):
    (root / "images").mkdir(parents=True)
    products = []
    for i in range(8):
        img = root / "images" / f"p{i}.png"
        Image.new("RGB", (16, 16), (30 * i, 10, 200 - 20 * i)).save(img)
        products.append(Product(id=f"p{i}", title=f"item {i}", images=[img], category=["A", f"B{i % 2}"]))
    queries = [Query(id=f"q{j}", text=f"looking for {j}", split="test") for j in range(3)]
    purchases = [Purchase("q0", "p2", 1), Purchase("q1", "p7", 2), Purchase("q2", "p4", 3)]
    write_store(root, products, queries, purchases)
    return root


def test_gallery_shows_the_purchase_marks_hits_and_points_out_shared_top5(tmp_path):
    store = _store(tmp_path / "store")
    ev = tmp_path / "eval"
    ev.mkdir()
    same = ["p0", "p1", "p2", "p3", "p5"]
    rows = [
        {"task": "text2product", "query_id": "q0", "ranked_product_ids": same + ["p4", "p6", "p7"]},  # hit at 3
        {"task": "text2product", "query_id": "q1", "ranked_product_ids": same + ["p6", "p7", "p4"]},  # p7 at 7
        {"task": "text2product", "query_id": "q2", "ranked_product_ids": same + ["p6", "p7"]},  # p4 not ranked
    ]
    (ev / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page, summary = _gallery(str(store), ev, None, n=3)
    assert summary == [
        "text2product: 1 distinct top-5 lists for 3 queries; the most common one is returned for 3 of them"
    ]
    assert page.count("card bought") == 3
    assert "purchased · rank 3" in page and "purchased · rank 7" in page and "purchased · not in top 7" in page
    assert page.count("card hit") == 1 and "3. ✔ purchased" in page
    assert page.count("the same top 5 as 2 other text2product queries") == 3


def test_gallery_swaps_in_a_query_with_a_hit_when_the_sample_has_none(tmp_path):
    store = _store(tmp_path / "store")
    ev = tmp_path / "eval"
    ev.mkdir()
    rows = [
        {"task": "text2product", "query_id": "q0", "ranked_product_ids": ["p2", "p1", "p0", "p3", "p5"]},
        {"task": "text2product", "query_id": "q1", "ranked_product_ids": ["p0", "p1", "p2", "p3", "p5"]},
        {"task": "text2product", "query_id": "q2", "ranked_product_ids": ["p0", "p1", "p2", "p3", "p6"]},
    ]
    (ev / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page, _ = _gallery(str(store), ev, None, n=1)
    assert "(picked: a query with a hit)" in page and "1. ✔ purchased" in page


def _run(tmp_path, name, *, best_step=None, steps=9, records=None):
    run = tmp_path / name
    (run / "final").mkdir(parents=True)
    recs = records or [{"step": s, "loss": 3.0, "negatives_per_query": 20.0} for s in range(1, steps + 1)]
    for r in recs:
        if r["step"] % 3 == 0:
            r["val_recall@10"] = 0.1 if r["step"] == best_step else 0.05
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "config.yaml").write_text("optim: {warmup_steps: 1}\n")
    if best_step is not None:
        (run / "best").mkdir()
        (run / "best.json").write_text(json.dumps({"step": best_step, "val_recall@10": 0.1}))
    return run


def test_the_best_validation_checkpoint_is_scored_and_the_report_says_so(tmp_path):
    with_val = scored_checkpoint(_run(tmp_path, "a", best_step=3), 9)
    assert with_val["name"] == "best" and with_val["path"].endswith("/a/best") and with_val["step"] == 3
    assert with_val["val_recall@10"] == 0.1 and "val_hit@10" not in with_val  # older runs log no hit rate
    assert (with_val["final_val_step"], with_val["final_val_recall@10"]) == (9, 0.05)
    without = scored_checkpoint(_run(tmp_path, "b"), 9)
    assert without["name"] == "final" and without["path"].endswith("/b/final") and "no best/" in without["why"]

    trained = {"m": SimpleNamespace(outputs={"model": with_val["path"], "checkpoint": with_val})}
    evaluated = {
        "m": SimpleNamespace(outputs={"model": with_val["path"], "checkpoint": with_val}),
        "random": SimpleNamespace(outputs={"model": "random"}),
    }
    rows = checkpoint_rows(trained, evaluated)
    assert rows[0][:2] == ["m", "best/ (step 3)"]
    assert rows[0][2] == "best validation Recall@10 (10.0 %) at step 3 of 9; the last validation (step 9) gave 5.0 %"
    assert rows[1] == ["random", "as built", "not trained (the floor)"]
    rows = checkpoint_rows({"m": SimpleNamespace(outputs={"checkpoint": without})}, {"m": SimpleNamespace(outputs={})})
    assert rows == [["m", "final/", without["why"]]]


def test_training_rows_compare_each_window_with_its_own_chance_level(tmp_path):
    def recs(losses, negatives, cosines):
        return [
            {"step": i + 1, "loss": loss, "contrastive": loss, "negatives_per_query": n, "product_cosine": c}
            for i, (loss, n, c) in enumerate(zip(losses, negatives, cosines, strict=True))
        ]

    filling = [33.0, 66, 99, 132, 165] + [288.0] * 15  # the memory queue fills
    trained = {
        name: SimpleNamespace(outputs={"model": str(_run(tmp_path, name, records=r) / "final")})
        for name, r in {
            "moon": recs([4.0] * 20, filling, [0.997] * 20),  # issue #19: far below chance, collapsed
            "towers": recs([3.3] * 20, filling, [0.8] * 20),
            "old": [{"step": s, "loss": math.log(32), "negatives_per_query": 31.0} for s in range(1, 11)],
        }.items()
    }
    header, rows = training_rows(trained)
    assert header[-1] == "verdict" and header[2:6] == [
        "loss, first 5",
        "chance, first 5",
        "loss, last 5",
        "chance, last 5",
    ]
    by = {r[0]: r for r in rows}
    first_chance = sum(math.log1p(n) for n in filling[:5]) / 5
    assert by["moon"][3] == f"{first_chance:.3f}" and by["moon"][5] == f"{math.log(289):.3f}"
    assert by["moon"][7:] == [str(1 + 10), "–", "collapsed"]  # warm-up 1, then 10 collapsed steps: the trainer's step
    assert by["towers"][-3:] == ["–", "–", "learning"]  # neither collapsed nor relapsed
    assert by["old"][6] == "n/a" and by["old"][-1] == "at chance"  # no product_cosine, no chance_loss logged
    assert plot_training(trained, tmp_path / "t.png").stat().st_size > 0
    assert plot_training({}, tmp_path / "none.png") is None


def test_timing_table_has_every_stage_the_report_and_totals():
    records = [StageRecord("world", "k", 10.0, {}, cached=True), StageRecord("train-m", "k", 100.0, {})]
    rows = timing_rows(records, 7.5)
    assert rows == [
        ["world", "10.0", "yes"],
        ["train-m", "100.0", ""],
        ["report (pictures, gallery, this page)", "7.5", ""],
        ["total, this run", "107.5", ""],
        ["total, every stage as it ran", "117.5", ""],
    ]


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("MOON_PROGRESS", "off")
