"""`moon ablate`: the paper's ablations on the product world, mean ± std over seeds.

Variants (PAPER.md §7): ``full`` MOON; ``no-crops`` (no core-region crops); ``dense`` (no MoE);
``learned-router`` (MoE without the aspect guidance); ``no-hard`` (no same-category hard
negatives); ``with-queue`` (adds temporal negatives: a memory queue, which the default recipe
leaves out); ``in-batch-only`` (no hard, spatial or temporal negatives). Spatial (cross-process)
negatives exist only when training runs in several processes; a one-process ablation has none in
any variant. Each variant is trained with the same budget for every seed and scored by the
same harness; world, detector and every (variant, seed) run are cached stages.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moon.bench.report import RANKINGS_FILE
from moon.demo.pipeline import PRETRAINED_LR, DemoConfig, ModelRun, _detector, _evaluate, _slug, _train, _world
from moon.demo.report import RETRIEVAL, TRAINING_HEALTH_NOTE, markdown_table, training_rows
from moon.demo.stages import StageRunner
from moon.errors import ConfigError
from moon.train.collapse import COSINE_THRESHOLD, PATIENCE

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no-crops": {"crops": False, "overrides": {"use_crops": False}},
    "dense": {"overrides": {"moe_mode": "dense"}},
    "learned-router": {"overrides": {"moe_mode": "learned"}},
    "no-hard": {"train_overrides": {"negatives.hard": 0}},
    # the default recipe has no memory queue (docs/training.md, "A stable recipe"), so the paper's
    # temporal negatives are the variant here: a 256-vector queue whose entries are at most 2 steps
    # old (the age that trained without relapse; 8 drifted back towards chance)
    "with-queue": {"train_overrides": {"negatives.queue_size": 256, "negatives.queue_max_age": 2}},
    "in-batch-only": {"train_overrides": {"negatives.hard": 0, "negatives.spatial": False, "negatives.queue_size": 0}},
}

#: the paper's claim each variant tests: +1 "full is better than the variant" (the removed idea
#: helps), -1 "the variant is better than full" (the added idea helps)
CLAIM_SIGN = {"with-queue": -1}

#: what each variant is expected to hurt, after the paper (directions only)
EXPECTED = {
    "no-crops": "image retrieval",
    "dense": "classification and attributes",
    "learned-router": "classification and attributes",
    "no-hard": "a little everywhere (same-category negatives teach fine distinctions)",
    "with-queue": "helps a little (more negatives per step)",
    "in-batch-only": "a little everywhere",
}


@dataclass
class AblationConfig:
    spec: str = "moon-smol"
    overrides: dict[str, Any] = field(default_factory=dict)
    # train-config overrides for every variant (dotted keys, as ModelRun.train_overrides)
    train_overrides: dict[str, Any] = field(
        default_factory=lambda: {**PRETRAINED_LR, "optim.lr_scale": {"projector": 10.0}}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(models=[]))

    @classmethod
    def from_yaml(cls, path: str | Path) -> AblationConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        known = {"spec", "overrides", "train_overrides", "seeds", "variants", "demo"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{p}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        demo_raw = raw.get("demo") or {}
        demo_fields = set(DemoConfig.__dataclass_fields__) - {"models"}
        bad = set(demo_raw) - demo_fields
        if bad:
            raise ConfigError(f"{p}: unknown demo keys {sorted(bad)} (known: {sorted(demo_fields)})")
        cfg = cls(
            spec=str(raw.get("spec", "moon-smol")),
            overrides=dict(raw.get("overrides") or {}),
            train_overrides=dict(raw.get("train_overrides") or {}),
            seeds=[int(s) for s in raw.get("seeds", [0, 1, 2])],
            variants=list(raw.get("variants", list(VARIANTS))),
            demo=DemoConfig(models=[], **demo_raw),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for v in self.variants:
            if v not in VARIANTS:
                raise ConfigError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        if not self.seeds:
            raise ConfigError("seeds must not be empty")
        self.demo.validate()


def _run_for(
    variant: str, spec: str, base_overrides: dict[str, Any], base_train: dict[str, Any] | None = None
) -> ModelRun:
    v = VARIANTS[variant]
    return ModelRun(
        name=variant,
        spec=spec,
        overrides={**base_overrides, **v.get("overrides", {})},
        crops=v.get("crops", True),
        train_overrides={**(base_train or {}), **v.get("train_overrides", {})},
    )


def summary_scores(results: dict[str, Any]) -> dict[str, float]:
    """The numbers an ablation compares: R@10 of each retrieval task, mean classification and
    attribute accuracy."""
    tasks = results["tasks"]
    out: dict[str, float] = {}
    for t in RETRIEVAL:
        if "recall@10" in tasks.get(t, {}).get("metrics", {}):
            out[f"{t} R@10"] = tasks[t]["metrics"]["recall@10"]
    for prefix, label in (("classification-", "classification acc"), ("attribute-", "attribute acc")):
        accs = [v["metrics"]["accuracy"] for k, v in tasks.items() if k.startswith(prefix)]
        if accs:
            out[label] = float(np.mean(accs))
    return out


def run_ablation(out_dir: str | Path, cfg: AblationConfig, *, log: Callable[[str], None] = print) -> Path:
    """Train and evaluate every (variant, seed); write ablation.json / ablation.md / ablation.png."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*images > max_images=.*")  # capped on purpose (overrides)
        return _run_ablation(out_dir, cfg, log)


def _run_ablation(out_dir: str | Path, cfg: AblationConfig, log: Callable[[str], None]) -> Path:
    cfg.validate()
    out = Path(out_dir)
    from moon.model.feature_store import default_root

    with default_root(out / "feature-cache"):  # image features once per image, across variants and runs
        return _run_variants(out, cfg, log)


def _run_variants(out: Path, cfg: AblationConfig, log: Callable[[str], None]) -> Path:
    runner = StageRunner(out / "stages", log=log)
    d = cfg.demo
    world = runner.run("world", {"products": d.products, "seed": d.seed, "profile": d.profile}, lambda s: _world(s, d))
    store_dir = world.outputs["store"]
    detector = runner.run(
        "detector",
        {"epochs": d.detector_epochs, "max_images": d.detector_max_images, "seed": d.seed, "design": 2},
        lambda s: _detector(s, store_dir, d),
        after=[world],
    )
    scores: dict[str, list[dict[str, float]]] = {}
    rankings: dict[str, list[Path]] = {}
    trained_runs: dict[str, Any] = {}
    runs = {variant: _run_for(variant, cfg.spec, cfg.overrides, cfg.train_overrides) for variant in cfg.variants}
    total, done = len(cfg.variants) * len(cfg.seeds), 0
    # seed-major: every variant of seed 0 first, so a stopped run leaves whole seeds; after each run
    # the results files are rewritten with what is finished (a stopped process loses the run in flight)
    for seed in cfg.seeds:
        seeded = replace(d, seed=seed)
        for variant in cfg.variants:
            run = runs[variant]
            tag = f"{_slug(variant)}-seed{seed}"
            trained = runner.run(
                f"train-{tag}",
                {
                    "run": run.__dict__,
                    "steps": d.steps,
                    "batch": d.batch_size,
                    "lr": d.lr,
                    "seed": seed,
                    "hard": d.hard_negatives,
                    "queue": d.queue_size,
                },
                lambda s, run=run, seeded=seeded: _train(s, run, seeded, store_dir),
                after=[world, detector],
            )
            evaluated = runner.run(
                f"eval-{tag}",
                {"run": run.__dict__, "max_queries": d.eval_max_queries, "seed": seed},
                lambda s, run=run, seeded=seeded, trained=trained: _evaluate(s, run, seeded, store_dir, trained),
                after=[trained, detector],
            )
            res = json.loads(Path(evaluated.outputs["results"]).read_text(encoding="utf-8"))
            scores.setdefault(variant, []).append(summary_scores(res))
            rankings.setdefault(variant, []).append(Path(evaluated.outputs["results"]).parent / RANKINGS_FILE)
            trained_runs[tag] = trained
            done += 1
            if done < total:
                write_ablation(
                    out,
                    cfg,
                    scores,
                    health=training_rows(trained_runs),
                    comparisons=compare_to_baseline(scores, rankings) if "full" in scores else None,
                    finished=(done, total),
                )
    comparisons = compare_to_baseline(scores, rankings) if "full" in scores else None
    return write_ablation(out, cfg, scores, health=training_rows(trained_runs), comparisons=comparisons)


def compare_to_baseline(
    scores: dict[str, list[dict[str, float]]],
    rankings: dict[str, list[Path]] | None = None,
    baseline: str = "full",
    *,
    n_resamples: int = 2000,
) -> dict[str, dict[str, dict[str, Any]]]:
    """variant → metric → the difference ``variant − baseline`` with two 95 % intervals and the
    paper's claim read from them.

    Runs are paired by position (the i-th seed of each variant). ``seeds``: the paired t-interval over
    seeds (:func:`moon.bench.stats.paired_seeds`: training noise; undefined for one seed).
    ``queries`` (retrieval metrics, when ``rankings`` holds each run's ``rankings.jsonl``): the paired
    bootstrap over the (seed, query) pairs pooled over seeds (:func:`moon.bench.stats.paired_bootstrap`:
    the noise of a finite test set). ``claim`` is :func:`moon.bench.stats.verdict` for the paper's
    direction (:data:`CLAIM_SIGN`), ``supported``/``contradicted`` only when every interval available
    excludes 0 on the same side, else ``inconclusive``."""
    from moon.bench.stats import align, paired_bootstrap, paired_seeds, per_query_scores, verdict

    base = scores[baseline]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, runs in scores.items():
        if variant == baseline:
            continue
        n = min(len(runs), len(base))
        sign = CLAIM_SIGN.get(variant, 1)
        out[variant] = {}
        for metric in sorted({m for r in runs[:n] for m in r} & {m for r in base[:n] for m in r}):
            # seeds where both runs have the metric (a task without test queries has none)
            pairs = [
                (i, runs[i].get(metric), base[i].get(metric))
                for i in range(n)
                if _finite(runs[i].get(metric)) and _finite(base[i].get(metric))
            ]
            if not pairs:
                continue
            a = [x for _, x, _ in pairs]
            b = [y for _, _, y in pairs]
            tests = {"seeds": paired_seeds(a, b)} if len(pairs) >= 2 else {}
            task = metric[: -len(" R@10")] if metric.endswith(" R@10") else None
            if task and rankings and len(rankings.get(variant, [])) >= n and len(rankings.get(baseline, [])) >= n:
                pa, pb = [], []
                for i, _, _ in pairs:
                    x, y = align(
                        per_query_scores(rankings[variant][i], task), per_query_scores(rankings[baseline][i], task)
                    )
                    pa.append(x)
                    pb.append(y)
                tests["queries"] = paired_bootstrap(np.concatenate(pa), np.concatenate(pb), n_resamples=n_resamples)
            reads = set()
            for t in tests.values():  # t is of variant − baseline; the claim reads baseline − variant when sign is +1
                claim_test = replace(t, difference=-sign * t.difference, ci95=_signed(t.ci95, -sign))
                reads.add(verdict(claim_test))
            claim = reads.pop() if len(reads) == 1 and tests else "inconclusive"
            out[variant][metric] = {
                "difference": float(np.mean(a) - np.mean(b)),
                "claim": claim,
                **{k: {"ci95": list(t.ci95), "p": t.p_value, "n": t.n} for k, t in tests.items()},
            }
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and bool(np.isfinite(x))


def _signed(ci: tuple[float, float], sign: int) -> tuple[float, float]:
    return ci if sign > 0 else (-ci[1], -ci[0])


def aggregate(scores: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant → metric → {mean, std, n} (std is the sample std; 0 for a single seed)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for variant, runs in scores.items():
        metrics = sorted({m for r in runs for m in r})
        table[variant] = {}
        for m in metrics:
            vals = np.array([r[m] for r in runs if m in r], dtype=np.float64)
            table[variant][m] = {
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                "n": int(len(vals)),
            }
    return table


def comparison_lines(comparisons: dict[str, dict[str, dict[str, Any]]], metrics: list[str]) -> list[str]:
    """The Markdown section of :func:`compare_to_baseline`: one row per variant, one cell per metric."""

    def cell(c: dict[str, Any] | None) -> str:
        if not c:
            return "–"
        parts = [f"{100 * c['difference']:+.1f}"]
        for key, label in (("queries", "q"), ("seeds", "s")):
            if key in c:
                lo, hi = c[key]["ci95"]
                parts.append(f"{label} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        return " ".join(parts) + f" **{c['claim']}**"

    lines = [
        "## Against full (percentage points, variant − full)",
        "",
        "Each cell: the difference of the means, its 95 % intervals — q: paired bootstrap over the test queries "
        "of every seed pooled (test-set noise), s: paired t over seeds (training noise) — and the paper's claim "
        "for that variant read from them (supported or contradicted only when every interval excludes 0 on the "
        "same side). The claim is that full beats a variant that removes an idea, and that with-queue beats full.",
        "",
        "| variant | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for variant, row in comparisons.items():
        lines.append(f"| {variant} | " + " | ".join(cell(row.get(m)) for m in metrics) + " |")
    return lines


def _seeds(cfg: AblationConfig) -> str:
    n = len(cfg.seeds)
    return f"{n} seed" if n == 1 else f"{n} seeds"


def write_ablation(
    out: Path,
    cfg: AblationConfig,
    scores: dict[str, list[dict[str, float]]],
    health: tuple[list[str], list[list[str]]] | None = None,
    comparisons: dict[str, dict[str, dict[str, Any]]] | None = None,
    finished: tuple[int, int] | None = None,
) -> Path:
    """Write ablation.json, ablation.md (scores, then ``health``: the training-health table of
    :func:`moon.demo.report.training_rows`, one row per run) and ablation.png. ``finished``:
    ``(runs done, runs planned)`` while the ablation is still running (the files say it is partial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = aggregate(scores)
    metrics = sorted(
        {m for v in table.values() for m in v}, key=lambda m: (m not in [f"{t} R@10" for t in RETRIEVAL], m)
    )
    (out / "ablation.json").write_text(
        json.dumps(
            {
                "spec": cfg.spec,
                "seeds": cfg.seeds,
                "runs": scores,
                "summary": table,
                "vs_full": comparisons,
                "finished_runs": finished[0] if finished else sum(len(v) for v in scores.values()),
                "planned_runs": finished[1] if finished else sum(len(v) for v in scores.values()),
                "partial": finished is not None,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    lines = [
        f"# Ablation of {cfg.spec} on the product world ({_seeds(cfg)}, mean ± std, %)",
        "",
        *(
            [f"**Partial: {finished[0]} of {finished[1]} runs finished** (seed-major; the rest is still running).", ""]
            if finished
            else []
        ),
        "| variant | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for variant, row in table.items():
        cells = [f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}" if m in row else "–" for m in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Expected from the paper: " + "; ".join(f"{k} hurts {v}" for k, v in EXPECTED.items()) + "."]
    if comparisons:
        lines += ["", *comparison_lines(comparisons, metrics)]
    if health and health[1]:
        collapsed = sum(r[-1] == "collapsed" for r in health[1])
        lines += [
            "",
            "## Training health",
            "",
            f"{collapsed} of {len(health[1])} runs ended collapsed (product cosine ≥ {COSINE_THRESHOLD} for {PATIENCE} "
            "steps in a row after the warm-up, and still at the end: every product gets almost the same vector). "
            "Differences between collapsed variants are noise, not the ablated idea; see docs/training.md.",
            "",
            markdown_table(*health),
            "",
            TRAINING_HEALTH_NOTE,
        ]
    (out / "ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from moon.viz.axes import fit_y, legend_below

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) + 2), 4.6))
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(table))
    tops: list[float] = []
    for i, (variant, row) in enumerate(table.items()):
        means = [row.get(m, {}).get("mean", 0.0) for m in metrics]
        stds = [row.get(m, {}).get("std", 0.0) for m in metrics]
        tops += [a + b for a, b in zip(means, stds, strict=True)]
        ax.bar(x + (i - (len(table) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=variant)
    ax.set_xticks(x, metrics, rotation=30, ha="right", fontsize=8)
    fit_y(tops, log=False).apply(ax)
    ax.set_title(f"Ablations of {cfg.spec} (mean ± std over {_seeds(cfg)})")
    legend_below(fig, *ax.get_legend_handles_labels(), ncol=min(5, len(table)))
    fig.savefig(out / "ablation.png", dpi=110)
    plt.close(fig)
    return out / "ablation.md"
