import json

import pytest

from moon.demo import DemoConfig, ModelRun
from moon.demo.ablate import VARIANTS, AblationConfig, _run_for, aggregate, summary_scores, write_ablation
from moon.demo.pipeline import train_config_for
from moon.demo.report import headline_rows
from moon.errors import ConfigError


def _results(r10_text, acc_l1, acc_l2, acc_color):
    return {
        "tasks": {
            "text2product": {"metrics": {"recall@10": r10_text}},
            "classification-l1": {"metrics": {"accuracy": acc_l1}},
            "classification-l2": {"metrics": {"accuracy": acc_l2}},
            "attribute-color": {"metrics": {"accuracy": acc_color}},
        }
    }


def test_headline_rows_average_levels_and_mark_missing_tasks():
    header, rows = headline_rows({"m": _results(0.5, 0.2, 0.4, 0.9)})
    assert header[1] == "text2product R@10"
    assert rows == [["m", "50.0", "–", "–", "–", "30.0", "90.0"]]


def test_headline_rows_show_a_task_without_queries_as_missing():
    # a small world can have no text or image test queries: evaluate() gives those tasks None metrics
    none = {k: None for k in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")}
    res = _results(0.5, 0.2, 0.4, 0.9)
    res["tasks"]["text2product"] = {"metrics": none, "n_queries": 0}
    res["tasks"]["classification-l3"] = {"metrics": {"accuracy": None, "macro_f1": None}, "n_queries": 0}
    _, rows = headline_rows({"m": res})
    assert rows == [["m", "–", "–", "–", "–", "30.0", "90.0"]]


def test_every_demo_model_gets_the_same_data_and_budget(tmp_path):
    cfg = DemoConfig(steps=7, batch_size=9, hard_negatives=2)
    configs = [train_config_for(run, cfg, str(tmp_path), str(tmp_path / run.name)) for run in cfg.models if run.train]
    assert {(c.optim.steps, c.optim.batch_size, c.negatives.hard, c.data.dir) for c in configs} == {
        (7, 9, 2, str(tmp_path))
    }
    moon = next(c for c in configs if c.model.spec == "moon-smol")
    assert moon.data.crop_source == "learned"
    two_tower = next(c for c in configs if c.model.spec == "two-tower")
    assert two_tower.data.crop_source is None
    # both pretrained models: the same small base learning rate, a larger one for the new parts only
    assert moon.optim.lr == two_tower.optim.lr == 1e-4
    assert moon.optim.lr_scale == {"projector": 10.0} and two_tower.optim.lr_scale == {"head": 10.0}
    assert {c.run.precision for c in configs} <= {"bf16", "fp32"}


def test_the_default_recipe_has_no_queue_and_validates_at_least_every_20_steps(tmp_path):
    # the stable recipe (docs/training.md): a memory queue made the demo's runs drift back to chance
    for steps, every in ((100, 20), (200, 20), (20, 6), (2, 1)):
        cfg = DemoConfig(steps=steps)
        c = train_config_for(cfg.models[0], cfg, str(tmp_path), str(tmp_path / "o"))
        assert c.negatives.queue_size == 0 and c.run.val_every == every, steps


def test_variant_overrides_reach_the_train_config(tmp_path):
    cfg = DemoConfig(models=[])
    inbatch = train_config_for(_run_for("in-batch-only", "moon-small", {}), cfg, str(tmp_path), str(tmp_path / "o"))
    assert (inbatch.negatives.hard, inbatch.negatives.spatial, inbatch.negatives.queue_size) == (0, False, 0)
    nocrops = train_config_for(
        _run_for("no-crops", "moon-small", {"max_images": 3}), cfg, str(tmp_path), str(tmp_path / "o")
    )
    assert nocrops.data.crop_source is None and nocrops.model.overrides == {"max_images": 3, "use_crops": False}
    dense = _run_for("dense", "moon-small", {})
    assert dense.overrides == {"moe_mode": "dense"} and dense.crops
    nohard = train_config_for(_run_for("no-hard", "moon-small", {}), cfg, str(tmp_path), str(tmp_path / "o"))
    assert (nohard.negatives.hard, nohard.negatives.queue_size) == (0, 0)
    queue = train_config_for(_run_for("with-queue", "moon-small", {}), cfg, str(tmp_path), str(tmp_path / "o"))
    assert (queue.negatives.hard, queue.negatives.queue_size, queue.negatives.queue_max_age) == (1, 256, 2)
    assert set(VARIANTS) == {"full", "no-crops", "dense", "learned-router", "no-hard", "with-queue", "in-batch-only"}


def test_negative_variants_change_the_negatives_a_query_is_trained_against(tmp_path):
    """Each negatives switch does what its name says in a real (tiny) run: the metrics log counts
    the candidates each query was scored against."""
    from dataclasses import replace

    from moon.train import train
    from moon.train.metrics_log import read_metrics
    from moon.world import synthesize

    store = synthesize(tmp_path / "store", n_products=40, seed=0, show_progress=False)
    cfg = DemoConfig(models=[], steps=4, batch_size=4, hard_negatives=1)
    per_query = {}
    for name in ("full", "no-hard", "with-queue", "in-batch-only"):
        run = replace(_run_for(name, "moon-graft-tiny", {}), crops=False)
        c = train_config_for(run, cfg, str(store.root), str(tmp_path / name))
        c.run.val_every = 0
        summary = train(c)
        per_query[name] = [r["negatives_per_query"] for r in read_metrics(summary["run_dir"]) if "loss" in r]
    # batch 4: at most 3 other purchased products, plus up to one same-category hard negative per
    # query (4 in all); candidates equal to a query's own purchase are masked, hence "at most"
    full, nohard, inbatch, queue = (per_query[k] for k in ("full", "no-hard", "in-batch-only", "with-queue"))
    assert max(nohard) <= 3 and max(inbatch) <= 3 and 3 < max(full) <= 7
    assert nohard == inbatch  # one process: in-batch-only differs from no-hard only by spatial/queue, both off
    # the queue adds the last 2 steps' products (4 each) from step 2 on
    assert queue[0] <= 7 and min(queue[2:]) > 7 + 4


def test_aggregate_mean_and_sample_std():
    table = aggregate({"full": [{"a": 0.2}, {"a": 0.4}], "dense": [{"a": 0.3}]})
    assert table["full"]["a"]["mean"] == pytest.approx(0.3)
    assert table["full"]["a"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert table["dense"]["a"] == {"mean": 0.3, "std": 0.0, "n": 1}


def test_summary_scores_and_ablation_files(tmp_path):
    s = summary_scores(_results(0.5, 0.2, 0.4, 0.9))
    assert s == {"text2product R@10": 0.5, "classification acc": pytest.approx(0.3), "attribute acc": 0.9}
    cfg = AblationConfig(seeds=[0, 1], variants=["full", "dense"])
    write_ablation(tmp_path, cfg, {"full": [s, s], "dense": [s, s]})
    md = (tmp_path / "ablation.md").read_text()
    assert "| full | 50.0 ± 0.0 |" in md and (tmp_path / "ablation.png").stat().st_size > 0
    assert json.loads((tmp_path / "ablation.json").read_text())["summary"]["dense"]["attribute acc"]["n"] == 2
    assert "Training health" not in md
    health = (["model", "verdict"], [["full-seed0", "collapsed"], ["dense-seed0", "learning"]])
    write_ablation(tmp_path, cfg, {"full": [s, s], "dense": [s, s]}, health=health)
    md = (tmp_path / "ablation.md").read_text()
    assert "1 of 2 runs ended collapsed" in md and "| full-seed0 | collapsed |" in md


def test_ablation_config_errors_are_clear(tmp_path):
    bad = tmp_path / "a.yaml"
    bad.write_text("variants: [full, nope]\n")
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        AblationConfig.from_yaml(bad)
    bad.write_text("demo: {stepz: 3}\n")
    with pytest.raises(ConfigError, match="unknown demo keys"):
        AblationConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="no such config"):
        AblationConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unique"):
        DemoConfig(models=[ModelRun("a", "x"), ModelRun("a", "y")]).validate()


@pytest.mark.parametrize(
    "name, spec, steps",
    [
        ("ablate-small.yaml", "moon-small", 80),
        ("ablate-tiny.yaml", "moon-tiny", 80),
        ("ablate-smol.yaml", "moon-smol", 100),
    ],
)
def test_shipped_ablation_config_parses(name, spec, steps):
    from pathlib import Path

    cfg = AblationConfig.from_yaml(Path(__file__).parents[2] / "configs" / name)
    assert set(cfg.variants) <= set(VARIANTS) and cfg.seeds == [0, 1, 2] and cfg.demo.steps == steps
    if spec == "moon-smol":  # the claims study runs every variant
        assert cfg.variants == list(VARIANTS)
    assert cfg.spec == spec
    if spec == "moon-smol":  # the pretrained recipe: every variant gets the small lr, the projector 10x
        run = _run_for("in-batch-only", cfg.spec, cfg.overrides, cfg.train_overrides)
        assert run.train_overrides["optim.lr"] == 1e-4 and run.train_overrides["negatives.hard"] == 0


def test_training_rows_tell_learning_chance_and_collapse_apart(tmp_path):
    import math
    from types import SimpleNamespace

    from moon.demo.report import training_rows

    def run(name, losses, cosines):
        final = tmp_path / name / "final"
        final.mkdir(parents=True)
        lines = []
        for i, (loss, cos) in enumerate(zip(losses, cosines, strict=True)):
            rec = {"step": i + 1, "loss": loss, "negatives_per_query": 31.0}
            if cos is not None:
                rec["product_cosine"] = cos
            lines.append(json.dumps(rec))
        (final.parent / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return SimpleNamespace(outputs={"model": str(final)})

    chance = math.log(32)
    trained = {
        "good": run("good", [4.0] * 5 + [1.0] * 5, [0.3] * 10),
        "flat": run("flat", [chance] * 10, [0.5] * 10),
        "dead": run("dead", [9.0] * 5 + [chance] * 5, [0.999] * 10),
        "old": run("old", [chance] * 10, [None] * 10),
    }
    header, rows = training_rows(trained)
    assert header[-1] == "verdict"
    by = {r[0]: r for r in rows}
    c = f"{chance:.3f}"
    assert by["good"][1:] == ["10", "4.000", c, "1.000", c, "0.300", "–", "–", "learning"]
    assert by["flat"][-1] == "at chance" and by["dead"][-1] == "collapsed" and by["dead"][6] == "0.999"
    assert by["dead"][7] == "10"  # no warm-up recorded: the 10th collapsed step, where the trainer warns
    assert header[8] == "relapsed at step"
    assert by["old"][6] == "n/a" and by["old"][-1] == "at chance"


def _rankings(path, hits, n=40):
    """A rankings.jsonl of text2product where the first ``hits`` of ``n`` queries find their product."""
    rows = []
    for i in range(n):
        ranked = [f"p{i}"] + [f"x{j}" for j in range(9)] if i < hits else [f"x{j}" for j in range(10)]
        rows.append(
            {
                "task": "text2product",
                "query_id": f"q{i}",
                "ranked_product_ids": ranked,
                "relevant_product_ids": [f"p{i}"],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_variants_are_compared_with_full_by_queries_and_by_seeds(tmp_path):
    from moon.demo.ablate import compare_to_baseline, comparison_lines

    hits = {"full": [36, 38, 37], "dense": [20, 22, 18], "learned-router": [40, 40, 39], "with-queue": [36, 38, 37]}
    scores, rankings = {}, {}
    for variant, per_seed in hits.items():
        for seed, h in enumerate(per_seed):
            path = _rankings(tmp_path / f"{variant}-{seed}.jsonl", h)
            scores.setdefault(variant, []).append({"text2product R@10": h / 40, "classification acc": 0.5})
            rankings.setdefault(variant, []).append(path)
    cmp = compare_to_baseline(scores, rankings, n_resamples=500)
    assert set(cmp) == {"dense", "learned-router", "with-queue"}
    dense = cmp["dense"]["text2product R@10"]
    # the difference of the means: (60 - 111) / 120 queries
    assert dense["difference"] == pytest.approx((60 - 111) / 120)
    assert dense["queries"]["n"] == 120 and dense["seeds"]["n"] == 3
    assert dense["queries"]["ci95"][1] < 0 and dense["seeds"]["ci95"][1] < 0
    assert dense["claim"] == "supported"  # full beats the variant without MoE, by queries and by seeds
    assert cmp["learned-router"]["text2product R@10"]["claim"] in ("contradicted", "inconclusive")
    assert cmp["learned-router"]["text2product R@10"]["difference"] > 0
    same = cmp["with-queue"]["text2product R@10"]
    assert same["difference"] == 0 and same["claim"] == "inconclusive"
    # a metric without per-query rankings is compared over seeds only
    assert set(cmp["dense"]["classification acc"]) == {"difference", "claim", "seeds"}
    lines = "\n".join(comparison_lines(cmp, ["text2product R@10", "classification acc"]))
    assert "| dense | -42.5 q [" in lines and "**supported**" in lines


def test_with_queue_claims_the_other_direction():
    from moon.demo.ablate import compare_to_baseline

    scores = {
        "full": [{"m": 0.5}, {"m": 0.52}, {"m": 0.49}],
        "with-queue": [{"m": 0.6}, {"m": 0.63}, {"m": 0.61}],
        "no-hard": [{"m": 0.6}, {"m": 0.63}, {"m": 0.61}],
    }
    cmp = compare_to_baseline(scores)
    assert cmp["with-queue"]["m"]["claim"] == "supported"  # the queue helps: the variant is better
    assert cmp["no-hard"]["m"]["claim"] == "contradicted"  # removing hard negatives helped: against the paper


def test_a_tiny_ablation_runs_end_to_end_and_compares_with_full(tmp_path):
    from moon.demo.ablate import run_ablation

    cfg = AblationConfig(
        spec="moon-graft-tiny",
        train_overrides={},
        seeds=[0, 1],
        variants=["full", "dense"],
        demo=DemoConfig(
            models=[],
            products=40,
            detector_epochs=1,
            detector_max_images=40,
            steps=2,
            batch_size=4,
            eval_max_queries=20,
        ),
    )
    # stopped in the last run: seed-major order, so seed 0 is whole, and the files hold the 3 finished runs
    from moon.demo import ablate

    real_eval, real_train, calls = ablate._evaluate, ablate._train, {"eval": 0, "train": 0}

    class Stop(Exception):
        pass

    def stopping_eval(*args, **kwargs):
        calls["eval"] += 1
        if calls["eval"] == 4:
            raise Stop
        return real_eval(*args, **kwargs)

    def counting_train(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    ablate._evaluate, ablate._train = stopping_eval, counting_train
    try:
        with pytest.raises(Stop):
            run_ablation(tmp_path / "out", cfg, log=lambda m: None)
        partial = json.loads((tmp_path / "out" / "ablation.json").read_text(encoding="utf-8"))
        assert partial["partial"] and (partial["finished_runs"], partial["planned_runs"]) == (3, 4)
        assert {k: len(v) for k, v in partial["runs"].items()} == {"full": 2, "dense": 1}
        assert "Partial: 3 of 4 runs finished" in (tmp_path / "out" / "ablation.md").read_text(encoding="utf-8")
        # the rerun trains nothing again but the stopped run's model (its training had finished: cached)
        calls["train"] = 0
        ablate._evaluate = real_eval
        md = run_ablation(tmp_path / "out", cfg, log=lambda m: None)
        assert calls["train"] == 0
    finally:
        ablate._evaluate, ablate._train = real_eval, real_train
    data = json.loads((tmp_path / "out" / "ablation.json").read_text(encoding="utf-8"))
    assert not data["partial"] and data["finished_runs"] == 4
    assert "Partial" not in md.read_text(encoding="utf-8")
    assert set(data["summary"]) == {"full", "dense"} and all(len(v) == 2 for v in data["runs"].values())
    row = data["vs_full"]["dense"]
    retrieval = [m for m in row if m.endswith("R@10") and "queries" in row[m]]
    assert retrieval, row  # per-query intervals came from each run's rankings.jsonl
    assert all(row[m]["seeds"]["n"] == 2 for m in row)
    assert "## Against full" in md.read_text(encoding="utf-8")
    assert list((tmp_path / "out" / "feature-cache").rglob("*.npy"))  # features kept for the next run
