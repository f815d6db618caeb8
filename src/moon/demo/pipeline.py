"""The demo pipeline: each step a cached stage (see :mod:`moon.demo.stages`)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moon.demo.stages import StageRecord, StageRunner
from moon.errors import ConfigError


@dataclass
class ModelRun:
    """One model trained and evaluated by the demo.

    ``spec`` and ``overrides`` go to :func:`moon.models.load_embedder`; ``crops`` feeds the learned
    detector's crops; ``train`` False evaluates the model as it is (the ``random`` floor).
    """

    name: str
    spec: str
    overrides: dict[str, Any] = field(default_factory=dict)
    crops: bool = True
    train: bool = True
    train_overrides: dict[str, Any] = field(default_factory=dict)


#: a pretrained LM wants a small learning rate, the freshly initialised parts (the graft's
#: projector, the two-tower's image head) a larger one (benchmarks/graft_fit.py)
PRETRAINED_LR = {"optim.lr": 1e-4}


def default_models() -> list[ModelRun]:
    return [
        # moon-smol: EfficientNet-Lite0 + SmolLM2-135M (pretrained, installed offline by make setup)
        ModelRun(
            "MOON (moon-smol)", "moon-smol", train_overrides={**PRETRAINED_LR, "optim.lr_scale": {"projector": 10.0}}
        ),
        # the CLIP-style two-tower built from the same pretrained parts, trained alike
        ModelRun(
            "two-tower (same parts)",
            "two-tower",
            crops=False,
            train_overrides={**PRETRAINED_LR, "optim.lr_scale": {"head": 10.0}},
        ),
        ModelRun("pretrained-towers", "pretrained-towers", crops=False),
        ModelRun("random", "random", crops=False, train=False),
    ]


@dataclass
class DemoConfig:
    """Sizes and budgets of the demo. ``quick()`` gives the ≤ 5-minute variant."""

    products: int = 500
    seed: int = 0
    profile: str = "small"
    detector_epochs: int = 20
    detector_max_images: int = 1500
    steps: int = 100
    batch_size: int = 17
    hard_negatives: int = 1
    # no memory queue by default: with one, runs of this size drift back towards chance (product
    # vectors pulled together while the loss climbs), without one they learn steadily — measured in
    # docs/training.md ("A stable recipe"); the queue stays a switch (and an ablation variant)
    queue_size: int = 0
    lr: float = 5e-4
    eval_max_queries: int | None = 300
    eval_batch_size: int = 16
    models: list[ModelRun] = field(default_factory=default_models)
    threads: int | None = None

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(products=120, detector_epochs=8, detector_max_images=400, steps=20, eval_max_queries=100)

    def validate(self) -> None:
        if self.products < 20:
            raise ConfigError(f"products must be at least 20 (got {self.products})")
        if self.steps < 1 or self.batch_size < 2:
            raise ConfigError("steps must be ≥ 1 and batch_size ≥ 2")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique (got {names})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower()).strip("-")


def train_precision() -> str:
    """bf16 where the CPU (or GPU) runs it natively, else fp32 (emulated bf16 is slower than fp32)."""
    import torch

    from moon.precision import resolve_bf16

    return "bf16" if resolve_bf16("auto", "cuda" if torch.cuda.is_available() else "cpu") else "fp32"


def train_config_for(run: ModelRun, cfg: DemoConfig, store_dir: str, out: str) -> Any:
    """The `moon train` config of one demo model: same data, steps and batch for every model."""
    from moon.train.config import config_from_dict

    raw: dict[str, Any] = {
        "model": {"spec": run.spec, "overrides": dict(run.overrides)},
        "data": {"dir": store_dir, "crop_source": "learned" if run.crops else None, "val_max_queries": 200},
        "negatives": {"hard": cfg.hard_negatives, "queue_size": cfg.queue_size, "queue_max_age": 8},
        "optim": {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "warmup_steps": max(1, cfg.steps // 10),
        },
        "run": {
            "out": out,
            "precision": train_precision(),
            "seed": cfg.seed,
            "val_every": max(1, min(20, cfg.steps // 3)),  # ≥ 3 validations, at most 20 steps apart
            "ckpt_every": cfg.steps,
            "keep_last": 1,
            "tensorboard": False,
        },
    }
    for dotted, value in run.train_overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(raw)


def run_demo(out_dir: str | os.PathLike, cfg: DemoConfig | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Run every stage under ``out_dir`` and write ``report.md`` / ``report.html``; returns the report path."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*images > max_images=.*")  # capped on purpose (ModelRun)
        return _run_demo(out_dir, cfg, log)


def _run_demo(out_dir: str | os.PathLike, cfg: DemoConfig | None, log: Callable[[str], None]) -> Path:
    cfg = cfg or DemoConfig()
    cfg.validate()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from moon.model.feature_store import default_root

    with default_root(out / "feature-cache"):  # image features once per image, across resumed runs
        return _run_stages(out, cfg, log)


def _run_stages(out: Path, cfg: DemoConfig, log: Callable[[str], None]) -> Path:
    runner = StageRunner(out / "stages", log=log)

    world = runner.run(
        "world", {"products": cfg.products, "seed": cfg.seed, "profile": cfg.profile}, lambda d: _world(d, cfg)
    )
    store_dir = world.outputs["store"]
    detector = runner.run(
        "detector",
        {"epochs": cfg.detector_epochs, "max_images": cfg.detector_max_images, "seed": cfg.seed, "design": 2},
        lambda d: _detector(d, store_dir, cfg),
        after=[world],
    )
    trained: dict[str, StageRecord] = {}
    evaluated: dict[str, StageRecord] = {}
    for run in cfg.models:
        slug = _slug(run.name)
        model_stage: list[StageRecord] = [world] + ([detector] if run.crops else [])
        if run.train:
            trained[run.name] = runner.run(
                f"train-{slug}",
                {
                    "run": asdict(run),
                    "steps": cfg.steps,
                    "batch": cfg.batch_size,
                    "lr": cfg.lr,
                    "seed": cfg.seed,
                    "hard": cfg.hard_negatives,
                    "queue": cfg.queue_size,
                },
                lambda d, run=run: _train(d, run, cfg, store_dir),
                after=model_stage,
            )
            model_stage = [trained[run.name]]
        evaluated[run.name] = runner.run(
            f"eval-{slug}",
            {"run": asdict(run), "max_queries": cfg.eval_max_queries, "scores": "best-by-validation"},
            lambda d, run=run: _evaluate(d, run, cfg, store_dir, trained.get(run.name)),
            after=model_stage + [detector],
        )
    from moon.demo.report import write_report

    log("[report] writing …")
    path = write_report(out, cfg, runner.records, world, detector, trained, evaluated)
    log(f"[report] {path}")
    return path


# --------------------------------------------------------------------------- stages


def _world(stage_dir: Path, cfg: DemoConfig) -> dict[str, Any]:
    from moon.world import synthesize

    store = synthesize(
        stage_dir / "store", n_products=cfg.products, seed=cfg.seed, profile=cfg.profile, show_progress=True
    )
    return {"store": str(store.root), "stats": store.stats()}


def _detector(stage_dir: Path, store_dir: str, cfg: DemoConfig) -> dict[str, Any]:
    from moon.regions import evaluate_detector, load_detector, run_detection, train_learned

    model_dir = stage_dir / "learned"
    _, train_report = train_learned(
        store_dir, model_dir, epochs=cfg.detector_epochs, max_images=cfg.detector_max_images, seed=cfg.seed
    )
    evals = {}
    for name in ("learned", "saliency"):
        det = load_detector(name, model_dir if name == "learned" else None)
        evals[name] = _jsonable(evaluate_detector(store_dir, det, split="test", show_progress=False))
    det = load_detector("learned", model_dir)
    run_report = run_detection(store_dir, det, show_progress=True)
    return {
        "model": str(model_dir),
        "train": _jsonable(train_report),
        "eval": evals,
        "run": _jsonable(run_report),
    }


def scored_checkpoint(run_dir: str | os.PathLike, steps: int | None = None) -> dict[str, Any]:
    """Which checkpoint of a finished run the demo scores: ``best/`` (the best validation
    Recall@10) when validation ran, else ``final/``. Returns ``{"name", "path", "steps", "step",
    "val_recall@10", "val_hit@10"?, "final_val_step", "final_val_recall@10", "why"?}``."""
    from moon.train.metrics_log import read_metrics

    run_dir = Path(run_dir)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    steps = steps if steps is not None else max((int(r.get("step", 0)) for r in records), default=None)
    info: dict[str, Any] = {"steps": steps}
    vals = [r for r in records if r.get("val_recall@10") is not None]
    if vals:
        info["final_val_step"], info["final_val_recall@10"] = vals[-1]["step"], vals[-1]["val_recall@10"]
    best_json = run_dir / "best.json"
    if (run_dir / "best").is_dir() and best_json.is_file():
        meta = json.loads(best_json.read_text(encoding="utf-8"))
        at = next((r for r in vals if r.get("step") == meta.get("step")), {})
        info.update(name="best", path=str(run_dir / "best"), step=meta.get("step"))
        info["val_recall@10"] = meta.get("val_recall@10", at.get("val_recall@10"))
        if at.get("val_hit@10") is not None or meta.get("val_hit@10") is not None:
            info["val_hit@10"] = meta.get("val_hit@10", at.get("val_hit@10"))
    else:
        info.update(name="final", path=str(run_dir / "final"), step=steps)
        info["why"] = "no validation score (no val queries, or run.val_every 0), so there is no best/"
    return info


def _train(stage_dir: Path, run: ModelRun, cfg: DemoConfig, store_dir: str) -> dict[str, Any]:
    from moon.train import train

    config = train_config_for(run, cfg, store_dir, str(stage_dir / "run"))
    summary = train(config)
    run_dir = Path(summary["run_dir"])
    chosen = scored_checkpoint(run_dir, config.optim.steps)
    return {
        "model": chosen["path"],  # what evaluation scores
        "run": str(run_dir),
        "final": str(run_dir / "final"),
        "checkpoint": chosen,
        "summary": _jsonable(summary),
    }


def _evaluate(
    stage_dir: Path, run: ModelRun, cfg: DemoConfig, store_dir: str, trained: StageRecord | None
) -> dict[str, Any]:
    from moon.bench.cache import EmbeddingCache
    from moon.bench.report import write_results
    from moon.bench.runner import evaluate
    from moon.data import ProductStore
    from moon.models import load_embedder

    checkpoint = None
    if trained is not None:
        checkpoint = trained.outputs.get("checkpoint")
        if checkpoint is None:  # a train stage cached before the best/ hand-off: choose now
            checkpoint = scored_checkpoint(Path(trained.outputs["model"]).parent)
        spec = checkpoint["path"]
    else:
        spec = run.spec
    embedder = load_embedder(spec)
    store = ProductStore(store_dir, crop_source="learned" if run.crops else None)
    result = evaluate(
        embedder,
        store,
        split="test",
        batch_size=cfg.eval_batch_size,
        cache=EmbeddingCache(stage_dir / "cache"),
        max_queries=cfg.eval_max_queries,
        seed=cfg.seed,
        show_progress=True,
    )
    write_results(result, stage_dir)
    return {"results": str(stage_dir / "results.json"), "model": spec, "crops": run.crops, "checkpoint": checkpoint}


def _jsonable(obj: Any) -> Any:
    """Dataclasses / dicts / numbers → plain JSON values (for the stage records)."""
    for method in ("to_json", "as_dict"):
        if hasattr(obj, method):
            obj = getattr(obj, method)()
            break
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
