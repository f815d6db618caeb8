"""The training loop: ``train(config)`` runs (or resumes) one run directory, on 1 or N processes.

Run directory::

    RUN/config.yaml        the resolved config
    RUN/metrics.jsonl      one JSON object per logged step (step, loss, …, val_hit@10, val_recall@10)
    RUN/tb/                TensorBoard scalars
    RUN/checkpoints/       step-XXXXXXXX/ (see moon.train.checkpoints), the last K kept
    RUN/best/              the embedder with the best val_recall@10 (save_pretrained format)
    RUN/best.json          {"step", "val_hit@10", "val_recall@10"} of best/
    RUN/final/             the embedder after the last step

Validation logs two scores (moon.train.validation): ``val_hit@10``, the fraction of val queries with a
purchase in the top 10, and ``val_recall@10``, the fraction of purchases found (moon.bench's recall@10).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moon import progress
from moon.errors import ConfigError, TrainingError
from moon.models.encoding import encode_items
from moon.train import checkpoints as ckpt
from moon.train.collapse import CollapseWatch, RelapseWatch, chance_loss
from moon.train.config import TrainConfig, config_from_dict, read_yaml, validate_config
from moon.train.dataset import open_training_data, read_training_records
from moon.train.distributed import (
    DistContext,
    PeerFailedError,
    average_gradients,
    broadcast_object,
    init_distributed,
    shared_outcome,
)
from moon.train.losses import ContrastiveLoss
from moon.train.memory import MemoryQueue
from moon.train.metrics_log import (
    METRICS_FILE,
    MetricsLogger,
    RunFileWriteError,
    run_file_write_error,
    truncate_metrics,
    write_text_atomic,
)
from moon.train.negatives import NegativeSettings
from moon.train.optim import build_optimizer, build_scheduler
from moon.train.sampler import BatchSampler
from moon.train.step import ContrastiveStep
from moon.train.tuning import apply_tuning, build_trainable
from moon.train.validation import RECALL_KEY, hit_and_recall_at_k

# settings a resumed run may change; anything else must match the checkpointed config
_RESUME_MAY_CHANGE = {"run", "optim.steps"}


def _autocast_factory(config: TrainConfig, device: torch.device) -> Callable[[], Any]:
    precision = config.run.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    diffs = []
    for section in a:
        if section in _RESUME_MAY_CHANGE:
            continue
        for key in set(a[section]) | set(b.get(section, {})):
            if f"{section}.{key}" in _RESUME_MAY_CHANGE:
                continue
            if a[section].get(key) != b.get(section, {}).get(key):
                diffs.append(f"{section}.{key}: {b.get(section, {}).get(key)!r} → {a[section].get(key)!r}")
    return diffs


class Validator:
    """``{"val_hit@10", "val_recall@10"}`` of (at most ``max_queries``) val queries, or ``None``
    when none can be scored; product inputs are built once."""

    def __init__(self, model: Any, data: Any, max_queries: int, autocast: Callable[[], Any]):
        self.queries = sorted(data.val_queries, key=lambda q: q.id)[:max_queries]
        self.positives = data.val_positives
        self.products = data.catalog.products
        self.autocast = autocast
        self._product_items: list[Any] | None = None
        self._query_items: list[Any] | None = None
        self.model = model

    def __call__(self) -> dict[str, float] | None:
        if not self.queries:
            return None
        if self._product_items is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._product_items = self.model.build_product_inputs(self.products)
                self._query_items = self.model.build_query_inputs(self.queries)
            if caught:
                kinds = sorted({w.category.__name__ for w in caught})
                warnings.warn(
                    f"{len(caught)} {'/'.join(kinds)}s while building validation inputs, e.g.: {caught[0].message}",
                    caught[0].category,
                    stacklevel=2,
                )
        assert self._query_items is not None
        p = encode_items(self.model, self._product_items, batch_size=32, autocast=self.autocast)
        q = encode_items(self.model, self._query_items, batch_size=32, autocast=self.autocast)
        index = {str(x.id): i for i, x in enumerate(self.products)}
        relevant = [{index[pid] for pid in self.positives.get(x.id, ()) if pid in index} for x in self.queries]
        return hit_and_recall_at_k(q, p, relevant, k=10)


def train(config: TrainConfig, *, resume: bool = False, ctx: DistContext | None = None) -> dict[str, Any]:
    """Train (or with ``resume`` continue) the run in ``config.run.out``; returns a summary.

    Several processes: ``torchrun --nproc_per_node N --no-python moon train …`` (env:// rendezvous).
    """
    validate_config(config, check_paths=True)
    if config.run.strategy == "fsdp" and config.loss.learn_temperature:
        raise ConfigError(
            "loss.learn_temperature: a learnable temperature is not supported with run.strategy fsdp; fix loss.temperature"
        )
    ctx = ctx or init_distributed(config.run.device)
    fsdp = config.run.strategy == "fsdp" and ctx.distributed  # one process: nothing to shard
    if config.optim.batch_size % ctx.world_size:
        raise ConfigError(
            f"optim.batch_size {config.optim.batch_size} is not divisible by the {ctx.world_size} processes"
        )
    run_dir = Path(config.run.out)  # type: ignore[arg-type]
    legacy = ckpt.legacy_checkpoints(run_dir)
    if legacy:
        raise ckpt.CheckpointError(
            f"{legacy[-1]}: a checkpoint in the old pickled format (model.pt/trainer.pt); MOON no longer loads "
            "pickles (unpickling a file can run code), so this run cannot be resumed or extended. Start a new run "
            "with another --out (its final/ and best/ embedders, safetensors, still load)"
        )
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (last: step {latest[0]}); pass --resume to continue it or choose a new --out"
        )
    if resume and latest is not None and (run_dir / "config.yaml").is_file():
        saved = read_yaml(run_dir / "config.yaml")
        diffs = _config_differences(config.to_dict(), config_from_dict(saved).to_dict())
        if diffs:
            raise ConfigError(
                f"{run_dir}: --resume with a different config ({'; '.join(diffs[:4])}); only run.* and optim.steps may change"
            )
    # the records, and one stat of every image file they name: a FIFO, a directory or a missing file at
    # an image path is one error line now, before anything is written and before any model work, not a
    # failure (or a hang) at the step that draws it
    records = read_training_records(config.data.dir, crop_source=config.data.crop_source)  # type: ignore[arg-type]
    # rank 0 alone writes the run directory's files; each write's outcome is shared (shared_outcome: one
    # small all-reduce, which also serves as the barrier), so a failed write stops every process with a
    # one-line error instead of leaving the others waiting at the next collective forever
    with shared_outcome(ctx, str(run_dir / "config.yaml")):
        if ctx.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(run_dir / "config.yaml", config.to_yaml())
            except OSError as exc:
                raise _run_write_error(exc, run_dir / "config.yaml", "before the first step", run_dir) from exc

    seed = config.run.seed
    _seed_everything(seed)  # identical model init on every rank; a bad model option fails here, before images are read
    # the spec is from the caller's own config (the CLI's --config / --model / key=value), so a
    # py:module:factory spec is honoured; a run directory's saved config.yaml is only compared
    model = build_trainable(config.model.spec, config.model.overrides)
    apply_tuning(model, config.model)
    data = open_training_data(
        config.data.dir,  # type: ignore[arg-type]
        crop_source=config.data.crop_source,
        hash_cache=run_dir / "image-hashes.json" if ctx.is_main else None,
        image_guard=config.negatives.guard,
        records=records,
    )
    model.to(ctx.device)
    if hasattr(model, "calibrate") and not (resume and latest is not None):
        _calibrate(model, data, seed)  # e.g. MOON's centre vector; a resumed run restores it with the weights
    if fsdp:
        from moon.train.fsdp import shard_model

        shard_model(model, ctx)
    model.train()
    loss_mod = ContrastiveLoss(config.loss.temperature, learnable=config.loss.learn_temperature).to(ctx.device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.loss.learn_temperature:
        named.append(("loss.log_scale", loss_mod.log_scale))
    params = [p for _, p in named]
    if not params:
        raise ConfigError(f"model.spec {config.model.spec!r}: the model has no trainable parameters with this config")
    optimizer = build_optimizer(named, config.optim)
    scheduler = build_scheduler(optimizer, config.optim)
    dim = int(model.dim)
    queue = MemoryQueue(config.negatives.queue_size, dim, config.negatives.queue_max_age, ctx.device)
    sampler = BatchSampler(
        data.train_queries,
        data.train_positives,
        data.catalog,
        batch_size=config.optim.batch_size,
        mix=config.data.modality_mix,
        hard=config.negatives.hard,
        seed=seed,
    )
    autocast = _autocast_factory(config, ctx.device)
    settings = NegativeSettings(
        in_batch=config.negatives.in_batch,
        hard=config.negatives.hard,
        spatial=config.negatives.spatial,
        guard=config.negatives.guard,
    )
    step_fn = ContrastiveStep(
        model,
        loss_mod,
        data.catalog,
        settings,
        queue=queue,
        ctx=ctx,
        symmetric=config.loss.symmetric,
        chunk_size=config.optim.chunk_size,
        aux_weight=config.loss.aux_weight,
        autocast=autocast,
    )
    validator = Validator(model, data, config.data.val_max_queries, autocast)
    best = float("-inf")
    start = 0
    _seed_everything(seed * 1000 + 1 + ctx.rank)  # per-rank stream for dropout
    if resume and latest is not None:
        expect = ckpt.expected_states(model, optimizer, scheduler, loss_mod, queue, products=len(data.catalog.products))
        start, path, (model_sd, trainer_sd, rng) = _newest_readable_checkpoint(run_dir, ctx, expect)
        written, now = trainer_sd.get("strategy", "ddp"), "fsdp" if fsdp else "ddp"
        if written != now:
            raise ConfigError(
                f"{path}: written by a {written} run, resumed as {now} (run.strategy {config.run.strategy} on "
                f"{ctx.world_size} process(es)); DDP and FSDP checkpoints store the optimizer differently"
            )
        if fsdp:
            from moon.train.fsdp import load_full_states

            load_full_states(model, optimizer, model_sd, trainer_sd["optimizer"])
        else:
            ckpt.load_model_state(model, model_sd)
            optimizer.load_state_dict(trainer_sd["optimizer"])
        scheduler.load_state_dict(trainer_sd["scheduler"])
        loss_mod.load_state_dict(trainer_sd["loss"])
        queue.load_state_dict(trainer_sd["queue"])
        best = trainer_sd.get("best", best)
        if rng is not None:
            ckpt.set_rng_state(rng)
    with shared_outcome(ctx, str(run_dir / METRICS_FILE)):
        if ctx.is_main:
            try:  # a resumed run drops what the lost run logged after its checkpoint
                truncate_metrics(run_dir, start)
                logger = MetricsLogger(run_dir, tensorboard=config.run.tensorboard, enabled=True)
            except OSError as exc:
                raise _run_write_error(exc, run_dir / METRICS_FILE, f"before step {start + 1}", run_dir) from exc
        else:
            logger = MetricsLogger(run_dir, enabled=False)

    total = config.optim.steps
    collapse = CollapseWatch(start=config.optim.warmup_steps)
    relapse = RelapseWatch(start=config.optim.warmup_steps)
    # warnings (the collapse warning above all) are shown at the step that raises them, not summarised
    bar = progress.bar(
        total,
        "train",
        enabled=ctx.is_main and config.run.progress,
        unit="step",
        initial=start,
        summarize_warnings=False,
    )
    last: dict[str, Any] = {}
    if config.run.val_at_start and start == 0:
        scores = broadcast_object(validator() if ctx.is_main or fsdp else None, ctx)
        if scores is not None:
            _log(logger, {"step": 0, **scores}, run_dir, ctx)
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_mod.zero_grad(set_to_none=True)
            result = step_fn(sampler.batch(step), step)
            if not fsdp:  # FSDP's reduce-scatter already averaged the gradients
                average_gradients(params, ctx)
            grad_norm = None
            if config.optim.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip))
            _stop_if_diverged(step + 1, result.loss, grad_norm, params, run_dir)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            elapsed = time.perf_counter() - t0
            done = step + 1
            record: dict[str, Any] = {
                "step": done,
                "loss": result.loss,
                "contrastive": result.contrastive,
                "aux": result.aux,
                "negatives_per_query": result.negatives_per_query,
                "chance_loss": chance_loss(result.negatives_per_query),  # the loss of equal scores
                "lr": lr,
                "temperature": loss_mod.temperature,
                "samples_per_s": result.n_queries / elapsed if elapsed > 0 else 0.0,
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if math.isfinite(result.product_cosine):
                record["product_cosine"] = result.product_cosine
            for kind, count in step_fn.input_warnings.items():
                record[f"input_warnings.{kind}"] = count
            validate_now = config.run.val_every > 0 and (done % config.run.val_every == 0 or done == total)
            improved = False
            scores = None
            if validate_now:
                scores = validator() if ctx.is_main or fsdp else None  # sharded forward: every rank takes part
                scores = broadcast_object(scores, ctx)
                if scores is not None:
                    record.update(scores)
                    if scores[RECALL_KEY] > best:
                        best, improved = scores[RECALL_KEY], True
            if done % config.run.log_every == 0 or validate_now or done == total:
                _log(logger, record, run_dir, ctx)
            checkpoint_now = bool(config.run.ckpt_every and done % config.run.ckpt_every == 0) or done == total
            if (improved or checkpoint_now) and not fsdp:  # (sharded weights: checked by their own ranks' losses)
                _check_finite_weights(model, done, run_dir)
            if improved:  # (every rank: the scores were broadcast)
                with shared_outcome(ctx, f"best/ and best.json (step {done})"):
                    _save_embedder(model, run_dir / "best", config, ctx, fsdp)
                    if ctx.is_main:
                        _write_best_json(run_dir, done, scores)
            if checkpoint_now:
                _save_checkpoint(run_dir, done, model, optimizer, scheduler, loss_mod, queue, best, config, ctx, fsdp)
            if ctx.is_main:
                collapse.update(done, result.product_cosine, result.contrastive, record["chance_loss"])
                relapse.update(done, result.contrastive, record["chance_loss"], result.product_cosine)
            last = record
            bar.update(1)
            bar.set_postfix(
                loss=f"{result.loss:.4f}",
                neg_q=f"{result.negatives_per_query:.0f}",
                q_s=f"{record['samples_per_s']:.1f}",
            )
    finally:
        bar.close()
        logger.close()
    with shared_outcome(ctx, f"{run_dir / 'final'}/"):
        _save_embedder(model, run_dir / "final", config, ctx, fsdp)
    return {
        "run_dir": str(run_dir),
        "steps": total,
        "last": last,
        "best_val_recall@10": None if best == float("-inf") else best,
    }


def _run_write_error(exc: OSError, path: Path, during: str, run_dir: Path) -> RunFileWriteError:
    """The one-line error of a failed write of a run-directory file (not a checkpoint): it names the
    newest checkpoint, which ``--resume`` continues from."""
    found = ckpt.list_checkpoints(run_dir)
    if found:
        kept = f"the checkpoints written so far are intact (newest: {found[-1][1].name})"
    else:
        kept = "no checkpoint had been written yet (--resume starts the run again)"
    return run_file_write_error(exc, path, during=during, kept=kept)


def _write_best_json(run_dir: Path, step: int, scores: dict[str, float] | None) -> None:
    """``best.json`` through a temporary file: a failed write leaves the previous one whole and is a
    one-line :class:`RunFileWriteError`."""
    try:
        write_text_atomic(run_dir / "best.json", json.dumps({"step": step, **(scores or {})}) + "\n")
    except OSError as exc:
        during = f"the best validation score, step {step}; the previous best.json was left as it was"
        raise _run_write_error(exc, run_dir / "best.json", during, run_dir) from exc


def _log(logger: MetricsLogger, record: dict[str, Any], run_dir: Path, ctx: DistContext) -> None:
    """``logger.log(record)`` (rank 0; every rank calls); a failed write (a full disk) is a one-line
    :class:`RunFileWriteError`, and a stop on every rank."""
    with shared_outcome(ctx, str(logger.path)):
        try:
            logger.log(record)
        except OSError as exc:
            raise _run_write_error(exc, logger.path, f"the record of step {record['step']}", run_dir) from exc


def _newest_readable_checkpoint(
    run_dir: Path, ctx: DistContext, expect: ckpt.Expected | None = None
) -> tuple[int, Path, tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]]:
    """The newest checkpoint that reads back completely, with its states; a damaged newer one (a
    truncated file) is skipped with a warning. Every rank resumes from rank 0's choice."""
    problems = []
    chosen = None
    found = dict(ckpt.list_checkpoints(run_dir))
    for step in sorted(found, reverse=True):
        try:
            chosen = (step, found[step], ckpt.read_checkpoint(found[step], ctx.rank, expect))
            break
        except ckpt.CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"--resume: skipping a damaged checkpoint: {exc}", RuntimeWarning, stacklevel=2)
    agreed = broadcast_object(chosen[0] if chosen is not None else None, ctx)
    if agreed is not None and (chosen is None or chosen[0] != agreed):  # this rank saw another file damaged
        try:
            chosen = (agreed, found[agreed], ckpt.read_checkpoint(found[agreed], ctx.rank, expect))
        except ckpt.CheckpointError as exc:
            problems.append(str(exc))
            chosen = None
    if chosen is None or agreed is None:
        raise ckpt.CheckpointError(
            f"{run_dir}: no checkpoint can be resumed from ({'; '.join(problems)}); start a new run with another --out"
        )
    return chosen


CALIBRATION_SAMPLE = 128


def _calibrate(model: Any, data: Any, seed: int) -> None:
    """``model.calibrate(products, queries)`` on a seeded sample of the training data (the same on
    every rank, so every process starts from the same model)."""
    rng = random.Random(seed)
    products = list(data.catalog.products)
    queries = sorted(data.train_queries, key=lambda q: q.id)
    pick_p = rng.sample(range(len(products)), min(CALIBRATION_SAMPLE, len(products)))
    pick_q = rng.sample(range(len(queries)), min(CALIBRATION_SAMPLE, len(queries)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # input truncation is reported by the training steps
        model.calibrate([products[i] for i in sorted(pick_p)], [queries[i] for i in sorted(pick_q)])


def _stop_if_diverged(
    step: int, loss: float, grad_norm: float | None, params: list[torch.nn.Parameter], run_dir: Path
) -> None:
    """Raise :class:`TrainingError` before the optimizer applies a step whose loss or gradients are
    not finite (a diverged run must not go on, and must not end in ``final/`` with NaN weights)."""
    if grad_norm is None:  # no clipping configured: measure the norm anyway (clipping at inf changes nothing)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf"))) if params else 0.0
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise TrainingError(
        f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; this step was not applied and "
        f"final/ was not written (earlier checkpoints in {run_dir / 'checkpoints'} and best/ are kept). "
        "Lower optim.lr, set optim.grad_clip (e.g. 1.0), or use run.precision=fp32"
    )


def _check_finite_weights(model: Any, step: int, run_dir: Path) -> None:
    """Refuse to save non-finite weights (an update can overflow even when its gradients were finite)."""
    bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise TrainingError(
            f"training diverged at step {step}: parameter {bad} is no longer finite; nothing of this step was saved "
            f"and final/ was not written (earlier checkpoints in {run_dir / 'checkpoints'} and best/ are kept). "
            "Lower optim.lr or set optim.grad_clip (e.g. 1.0)"
        )


def _save_embedder(model: Any, directory: Path, config: TrainConfig, ctx: DistContext, fsdp: bool) -> None:
    """``save_pretrained`` on rank 0 (from a gathered full copy under FSDP; every rank must call)."""
    if fsdp:
        from moon.train.fsdp import save_unsharded

        save_unsharded(model, directory, config.model, ctx, build_trainable, apply_tuning)
    elif ctx.is_main:
        ckpt.save_pretrained_atomic(model, directory)


def _save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    loss_mod: Any,
    queue: MemoryQueue,
    best: float,
    config: TrainConfig,
    ctx: DistContext,
    fsdp: bool = False,
) -> None:
    if fsdp:  # collectives: every rank gathers, rank 0 receives the full tensors
        from moon.train.fsdp import full_model_state, full_optimizer_state

        model_sd, optim_sd = full_model_state(model), full_optimizer_state(model, optimizer)
    else:
        model_sd, optim_sd = (ckpt.model_state(model), optimizer.state_dict()) if ctx.is_main else ({}, {})
    what = f"checkpoint {ckpt.checkpoint_dir(run_dir, step).name}"
    tmp = ckpt.checkpoint_dir(run_dir, step).with_suffix(".tmp")
    # each stage's outcome is shared (one small all-reduce, in place of the barriers): a write that
    # fails on one rank stops every rank with a one-line error, none waits for the others forever
    with shared_outcome(ctx, what):
        if ctx.is_main:
            tmp = ckpt.begin_checkpoint(run_dir, step)
    try:
        with shared_outcome(ctx, what):
            ckpt.write_rng(tmp, ctx.rank)
    except PeerFailedError:  # another rank's write failed (every rank has finished writing): no half checkpoint left
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with shared_outcome(ctx, what):
        if ctx.is_main:
            trainer = {
                "step": step,
                "data_position": {"step": step, "examples_seen": step * config.optim.batch_size},
                "optimizer": optim_sd,
                "strategy": "fsdp" if fsdp else "ddp",
                "scheduler": scheduler.state_dict(),
                "loss": loss_mod.state_dict(),
                "queue": queue.state_dict(),
                "best": best,
                "config": config.to_dict(),
            }
            ckpt.finish_checkpoint(run_dir, step, tmp, model_sd, trainer, config.run.keep_last)
