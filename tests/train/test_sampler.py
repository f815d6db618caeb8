"""Batches follow the modality mix, are a pure function of (seed, step), and hard negatives come
from the deepest category level that has enough products."""

from __future__ import annotations

from collections import Counter

import pytest

from moon.errors import ConfigError
from moon.train.dataset import open_training_data
from moon.train.sampler import BatchSampler, modality_counts

MIX = {"image": 12, "text": 3, "multimodal": 2}


def test_modality_counts_follow_the_mix():
    assert modality_counts(17, MIX, ["image", "text", "multimodal"]) == {"image": 12, "text": 3, "multimodal": 2}
    assert modality_counts(34, MIX, ["image", "text", "multimodal"]) == {"image": 24, "text": 6, "multimodal": 4}
    assert sum(modality_counts(10, MIX, ["image", "text", "multimodal"]).values()) == 10
    # a modality the data lacks gives its share to the others
    assert modality_counts(15, MIX, ["image", "text"]) == {"image": 12, "text": 3}
    with pytest.raises(ConfigError):
        modality_counts(8, {"image": 1}, ["text"])


def test_batches_follow_mix_and_are_reproducible(small_store):
    data = open_training_data(small_store)
    a = BatchSampler(data.train_queries, data.train_positives, data.catalog, batch_size=17, mix=MIX, hard=2, seed=5)
    b = BatchSampler(data.train_queries, data.train_positives, data.catalog, batch_size=17, mix=MIX, hard=2, seed=5)
    for step in (0, 1, 9):
        batch = a.batch(step)
        assert Counter(e.query.modality for e in batch) == Counter(a.counts)
        assert [(e.query.id, e.positive, e.hard) for e in batch] == [
            (e.query.id, e.positive, e.hard) for e in b.batch(step)
        ]
    assert [e.query.id for e in a.batch(0)] != [e.query.id for e in a.batch(1)]
    for e in a.batch(3):
        assert e.query.id in data.train_positives
        assert data.catalog.products[e.positive].id in data.train_positives[e.query.id]


def test_each_epoch_visits_every_query_of_a_modality_once(small_store):
    data = open_training_data(small_store)
    s = BatchSampler(data.train_queries, data.train_positives, data.catalog, batch_size=17, mix=MIX, seed=1)
    n_text = len(s.pools["text"])
    per_step = s.counts["text"]
    seen = [e.query.id for step in range(n_text // per_step) for e in s.batch(step) if e.query.modality == "text"]
    assert len(seen) == len(set(seen))


def test_hard_negatives_come_from_the_deepest_category_with_enough_products(small_store):
    data = open_training_data(small_store)
    cat = data.catalog
    s = BatchSampler(data.train_queries, data.train_positives, cat, batch_size=17, mix=MIX, hard=3, seed=0)
    for e in s.batch(0):
        pos = cat.products[e.positive]
        assert len(e.hard) == 3
        for h in e.hard:
            assert cat.cluster[h] != cat.cluster[e.positive]
            assert cat.products[h].category == pos.category  # leaves hold 8 products: enough for 3
    # asking for more than a leaf holds falls back to the parent level
    pool = cat.hard_pool(0, 10)
    leaf = cat.products[0].category
    assert all(cat.products[j].category[:2] == leaf[:2] for j in pool)
    assert any(cat.products[j].category != leaf for j in pool)
