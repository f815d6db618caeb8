"""The demo keeps its frozen image features on disk under its output directory."""

from __future__ import annotations

import os

import numpy as np

from moon.model import feature_store


def test_the_demo_stores_image_features_under_its_output(tiny_demo):
    entries = list((tiny_demo / "feature-cache").rglob("*.npy"))
    assert entries, "no image features were stored"
    # one (k, D) float32 array per image, readable without pickles
    arr = np.load(entries[0], allow_pickle=False)
    assert arr.dtype == np.float32 and arr.ndim == 2
    # the demo set the variable for its own run only
    assert feature_store.ENV not in os.environ or os.environ[feature_store.ENV] != str(tiny_demo / "feature-cache")
