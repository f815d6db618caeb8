"""The collapse monitor: pairwise cosine known answers, the warning's trigger, and the logged value."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from moon.train.collapse import CollapseWatch, mean_pairwise_cosine


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
    with pytest.warns(RuntimeWarning, match="collapsed"):
        assert watch.update(8, 0.999)
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
