"""Collapse: pairwise cosine known answers, the per-step chance level, the one definition shared by
the trainer's warning and the reports' verdict, and the logged values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from moon.train.collapse import (
    COSINE_THRESHOLD,
    PATIENCE,
    CollapseWatch,
    assess,
    chance_loss,
    collapse_message,
    mean_pairwise_cosine,
    step_state,
)
from moon.train.losses import info_nce


def test_mean_pairwise_cosine_known_answers():
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[3.0, 4.0]]).repeat(5, 1)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])  # pairs: 0, -1, 0
    assert mean_pairwise_cosine(v) == pytest.approx(-1 / 3)
    x = torch.randn(7, 5)
    n = torch.nn.functional.normalize(x, dim=-1)
    brute = [float(n[i] @ n[j]) for i in range(7) for j in range(7) if i != j]
    assert mean_pairwise_cosine(x) == pytest.approx(sum(brute) / len(brute), abs=1e-6)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 3)))


def test_collapse_watch_warns_once_after_patience_and_ignores_warmup():
    watch = CollapseWatch(threshold=0.99, patience=3, start=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not watch.update(1, 1.0) and not watch.update(2, 1.0)  # warm-up steps do not count
        assert not watch.update(3, 0.999) and not watch.update(4, 0.995)
        assert not watch.update(5, 0.5)  # a healthy step resets the streak
        assert not watch.update(6, 0.999) and not watch.update(7, 0.999)
    with pytest.warns(RuntimeWarning, match="collapsed at step 8"):
        assert watch.update(8, 0.999)
    assert watch.collapsed_at == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not watch.update(9, 0.999)  # only once


def test_training_logs_product_cosine(tmp_path):
    from test_effective_negatives import _store

    from moon.train import load_config, train
    from moon.train.metrics_log import read_metrics

    store = _store(tmp_path / "store")
    cfg = load_config(
        extra={
            "model": {"spec": "py:toy_embedder:make_toy"},
            "data": {"dir": str(store), "modality_mix": {"text": 1}},
            "negatives": {"hard": 0, "queue_size": 0},
            "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
            "run": {
                "out": str(tmp_path / "run"),
                "val_every": 0,
                "ckpt_every": 0,
                "tensorboard": False,
                "progress": False,
            },
        }
    )
    train(cfg)
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2
    assert [r["chance_loss"] for r in records] == [chance_loss(r["negatives_per_query"]) for r in records]

    # step 1 logs the cosine of batch 0's purchased products under the untrained (seeded) toy
    from toy_embedder import make_toy

    from moon.train.dataset import open_training_data
    from moon.train.sampler import BatchSampler

    data = open_training_data(store)
    sampler = BatchSampler(
        data.train_queries, data.train_positives, data.catalog, batch_size=4, mix={"text": 1}, seed=cfg.run.seed
    )
    toy = make_toy()
    products = [data.catalog.products[e.positive] for e in sampler.batch(0)]
    with torch.no_grad():
        expected = mean_pairwise_cosine(toy(toy.collate(toy.build_product_inputs(products))))
    assert records[0]["product_cosine"] == pytest.approx(expected, abs=1e-6)
    assert records[1]["product_cosine"] != pytest.approx(expected, abs=1e-6)  # step 2: other products, new weights


def test_chance_loss_is_the_infonce_of_equal_scores():
    for negatives in (0, 1, 33, 288):
        logits = torch.full((3, 300), 0.7)  # every candidate scored alike
        allowed = torch.zeros(3, 300, dtype=torch.bool)
        allowed[:, : negatives + 1] = True
        positive = torch.zeros(3, dtype=torch.long)
        assert chance_loss(negatives) == pytest.approx(float(info_nce(logits, allowed, positive)[0]), abs=1e-6)
    assert chance_loss(288) == pytest.approx(math.log(289))  # the 5.67 of issue #19


def test_step_state_uses_cosine_first_then_loss_against_that_steps_chance():
    assert step_state(0.995, 1.0, 5.0) == "collapsed"  # alike products: collapsed even with a loss below chance
    assert step_state(0.5, 4.85, 5.0) == "learning"
    assert step_state(0.5, 4.95, 5.0) == "at chance"  # less than 0.1 nats below
    assert step_state(0.5, 9.0, 5.0) == "at chance"
    assert step_state(float("nan"), 1.0, 5.0) == "learning"  # no cosine logged: the loss decides
    assert step_state(COSINE_THRESHOLD, None, None) == "collapsed"


def _records(cosines, losses, chances):
    return [
        {"step": i + 1, "loss": loss + 0.01, "contrastive": loss, "chance_loss": ch, "product_cosine": cos}
        for i, (cos, loss, ch) in enumerate(zip(cosines, losses, chances, strict=True))
    ]


def test_assess_names_the_step_the_trainer_warns_at():
    rng = torch.Generator().manual_seed(0)
    for trial in range(20):
        cos = (torch.rand(40, generator=rng) * 0.03 + 0.975).tolist()  # streaks above and below 0.99
        watch = CollapseWatch(start=3)
        warned_at = None
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for i, c in enumerate(cos):
                if watch.update(i + 1, c, 4.0, 5.0):
                    warned_at = i + 1
        health = assess(_records(cos, [4.0] * 40, [5.0] * 40), warmup=3)
        assert health.collapsed_at == warned_at, trial


def test_assess_verdicts():
    n = 30
    rising = [3.5 + 2.2 * min(1, i / 10) for i in range(n)]  # the queue fills: log(34) → log(289)
    healthy = assess(_records([0.8] * n, [3.3] * n, rising), warmup=2)
    assert healthy.verdict == "learning" and healthy.collapsed_at is None
    assert healthy.first_chance == pytest.approx(sum(rising[:5]) / 5)  # per step, not one value
    assert healthy.last_chance == pytest.approx(sum(rising[-5:]) / 5)
    assert healthy.first_loss == pytest.approx(3.3)  # the contrastive part, which chance is for
    flat = assess(_records([0.8] * n, rising, rising), warmup=2)
    assert flat.verdict == "at chance"
    # issue #19's MOON: loss far below chance while every product gets the same vector
    dead = assess(_records([0.997] * n, [3.6] * n, rising), warmup=2)
    assert dead.verdict == "collapsed" and dead.collapsed_at == 2 + PATIENCE and dead.collapsed_steps == n - 2
    # issue #19's dual-encoder: collapsed for a while, then out again
    back = assess(_records([0.995] * 15 + [0.97] * 15, [5.0] * 15 + [4.6] * 15, [5.6] * n), warmup=2)
    assert back.verdict == "recovered" and back.collapsed_at == 12
    late = assess(_records([0.8] * 24 + [0.995] * 6, [3.0] * n, rising), warmup=2)
    assert late.verdict == "near collapse" and late.collapsed_at is None
    assert assess([{"step": 0, "val_recall@10": 0.1}]).verdict == "no data"


def test_the_warning_says_what_its_numbers_say():
    below = collapse_message(20, 10, 0.9972, 3.61, math.log(289))
    assert "3.610, is 2.06 below the chance level 5.666 = log(289 candidates per query)" in below
    assert "sits at" not in below
    at = collapse_message(20, 10, 0.9972, 5.63, math.log(289))
    assert "5.630, is at the chance level 5.666" in at
    above = collapse_message(20, 10, 0.9972, 8.0, math.log(289))
    assert "2.33 above the chance level" in above
    assert "for 10 steps in a row (now 0.9972)" in below


def make_collapsed():
    """The toy with a bias that dwarfs everything else: every vector points almost the same way."""
    from toy_embedder import make_toy

    toy = make_toy()
    with torch.no_grad():
        toy.proj.bias.fill_(50.0)
    return toy


def _train_toy(tmp_path, spec, steps, queue_size=16, warmup=0):
    from test_effective_negatives import _store

    from moon.train import load_config, train
    from moon.train.metrics_log import read_metrics

    cfg = load_config(
        extra={
            "model": {"spec": spec},
            "data": {"dir": str(_store(tmp_path / "store")), "modality_mix": {"text": 1}},
            "negatives": {"in_batch": True, "hard": 2, "queue_size": queue_size, "queue_max_age": 2, "guard": True},
            "optim": {"steps": steps, "batch_size": 4, "warmup_steps": warmup, "lr": 1e-5},
            "run": {
                "out": str(tmp_path / "run"),
                "val_every": 0,
                "ckpt_every": 0,
                "tensorboard": False,
                "progress": False,
            },
        }
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    return read_metrics(tmp_path / "run"), [w for w in caught if "collapsed" in str(w.message)]


def test_chance_level_follows_the_candidates_of_each_step(tmp_path):
    records, _ = _train_toy(tmp_path, "py:toy_embedder:make_toy", steps=3)
    # 3 in-batch + 8 hard, then + 12 and + 16 queue entries (see test_effective_negatives)
    assert [r["chance_loss"] for r in records] == pytest.approx([math.log(12), math.log(24), math.log(28)])


def test_the_trainer_warns_at_the_step_the_report_calls_collapsed(tmp_path):
    records, warned = _train_toy(tmp_path, "py:test_collapse:make_collapsed", steps=PATIENCE + 3, warmup=1)
    assert all(r["product_cosine"] > 0.999 for r in records)
    health = assess(records, warmup=1)
    assert health.verdict == "collapsed" and health.collapsed_at == 1 + PATIENCE
    assert len(warned) == 1 and f"collapsed at step {health.collapsed_at}:" in str(warned[0].message)
    # a model that scores every candidate alike has exactly the chance loss, step by step
    assert [r["contrastive"] for r in records] == pytest.approx([r["chance_loss"] for r in records], abs=1e-3)
    last = records[health.collapsed_at - 1]
    expected = (
        f"The loss, {last['contrastive']:.3f}, is at the chance level {last['chance_loss']:.3f} = log(28 candidates"
    )
    assert expected in str(warned[0].message)


def _relapse_run(n_learn=30, n_fall=30, chance=5.66):
    """Issue #26's run, shape for shape: the loss falls to ~2.8 (chance 5.66), then climbs back to 4.7."""
    losses = [chance - 0.2 - 2.6 * min(1.0, i / 15) for i in range(n_learn)] + [4.7] * n_fall
    return losses, [chance] * (n_learn + n_fall)


def test_relapse_watch_warns_once_when_a_run_loses_half_of_what_it_learned():
    from moon.train.collapse import RelapseWatch

    losses, chances = _relapse_run()
    watch = RelapseWatch(start=2)
    warned = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (loss, ch) in enumerate(zip(losses, chances, strict=True)):
            if watch.update(i + 1, loss, ch, 0.97):
                warned.append(i + 1)
    # peak margin 2.8 (steps 16-30 sit at the floor); from step 31 the margin is 0.96, and the 5-step
    # mean is 2.43, 2.06, 1.70, then 1.33 <= 1.4 (half the peak) at step 34: 10 such steps end at 43
    assert warned == [43] and watch.relapsed_at == 43 and watch.peak == pytest.approx(2.8)
    message = [str(w.message) for w in caught if "relapsed" in str(w.message)]
    assert len(message) == 1
    assert "relapsed at step 43" in message[0] and "against 2.80 at step" in message[0]
    assert "0.96 below the chance level" in message[0] and "mean cosine of 0.970" in message[0]


def test_relapse_watch_ignores_noise_a_slow_start_and_runs_that_never_learned():
    from moon.train.collapse import RelapseWatch

    rng = torch.Generator().manual_seed(0)
    # a healthy run with batch noise of ±0.6 nats around a margin of 2.5: never a relapse
    noisy = (5.66 - 2.5 + (torch.rand(200, generator=rng) - 0.5) * 1.2).tolist()
    watch = RelapseWatch(start=10, warn=False)
    assert not any(watch.update(i + 1, loss, 5.66) for i, loss in enumerate(noisy))
    # a run that never got 0.5 nats below chance cannot relapse, however it wanders
    weak = [5.66 - 0.4] * 20 + [5.66] * 40
    watch = RelapseWatch(warn=False)
    assert not any(watch.update(i + 1, loss, 5.66) for i, loss in enumerate(weak))
    # a dip that lasts fewer than PATIENCE steps is not a relapse
    losses, chances = _relapse_run(n_fall=0)
    dip = losses + [4.7] * 8 + [2.9] * 20
    watch = RelapseWatch(warn=False)
    assert not any(watch.update(i + 1, loss, 5.66) for i, loss in enumerate(dip))
    # warm-up steps are not fed (a fresh model's loss starts anywhere)
    watch = RelapseWatch(start=100, warn=False)
    assert not any(watch.update(i + 1, loss, ch) for i, (loss, ch) in enumerate(zip(*_relapse_run(), strict=True)))


def test_assess_calls_a_run_relapsed_at_the_step_the_trainer_warns_at():
    losses, chances = _relapse_run()
    down = assess(_records([0.95] * len(losses), losses, chances), warmup=2)
    assert down.verdict == "relapsed" and down.relapsed_at == 43 and down.collapsed_at is None
    # relapsed, then learned again: the step is kept, the verdict is what the end looks like
    back_losses = losses + [2.9] * 20
    back = assess(_records([0.9] * len(back_losses), back_losses, [5.66] * len(back_losses)), warmup=2)
    assert back.verdict == "learning" and back.relapsed_at == 43
    healthy = assess(_records([0.8] * 30, [3.0] * 30, [5.66] * 30), warmup=2)
    assert healthy.relapsed_at is None and healthy.verdict == "learning"


def test_the_trainer_feeds_the_relapse_watch_what_it_logs(tmp_path, monkeypatch):
    # the report replays metrics.jsonl through RelapseWatch; the trainer must feed it the same numbers
    import moon.train.loop as loop
    from moon.train.collapse import RelapseWatch

    fed = []

    class Spy(RelapseWatch):
        def update(self, step, loss, chance, cosine=None):
            fed.append((step, loss, chance, cosine, self.start))
            return super().update(step, loss, chance, cosine)

    monkeypatch.setattr(loop, "RelapseWatch", Spy)
    records, _ = _train_toy(tmp_path, "py:toy_embedder:make_toy", steps=4, warmup=1)
    assert [f[0] for f in fed] == [r["step"] for r in records] == [1, 2, 3, 4]
    for (_, loss, chance, cosine, start), r in zip(fed, records, strict=True):
        assert start == 1  # the warm-up
        assert loss == pytest.approx(r["contrastive"]) and chance == pytest.approx(r["chance_loss"])
        assert cosine == pytest.approx(r["product_cosine"])
