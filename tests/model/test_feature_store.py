"""The on-disk feature store: round trips, keys, damaged entries, unwritable roots, $MOON_FEATURE_CACHE."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import pytest
import torch

from moon.model import feature_store as fs
from moon.model.feature_store import ENV, FeatureStore, content_key, from_env

VKEY = "0123456789abcdef"
SHAPE = (4, 8)
KEY = hashlib.sha256(b"an image").hexdigest()


def feats(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_round_trip_persists_across_instances(tmp_path):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    assert store.get(KEY) is None
    f = feats()
    store.put(KEY, f)
    for s in (store, FeatureStore(str(tmp_path), VKEY, SHAPE)):
        got = s.get(KEY)
        assert got.dtype == torch.float32 and tuple(got.shape) == SHAPE
        assert torch.equal(got, f)
    assert store.path(KEY) == tmp_path / VKEY / KEY[:2] / f"{KEY}.npy"
    assert store.directory == tmp_path / VKEY and store.root == tmp_path


def test_get_returns_a_fresh_tensor(tmp_path):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    store.put(KEY, feats())
    store.get(KEY).zero_()
    assert torch.equal(store.get(KEY), feats())


def test_vision_keys_are_separate(tmp_path):
    FeatureStore(tmp_path, VKEY, SHAPE).put(KEY, feats())
    assert FeatureStore(tmp_path, "fedcba9876543210", SHAPE).get(KEY) is None


def test_no_temp_files_left(tmp_path):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    store.put(KEY, feats(1))
    store.put(KEY, feats(1))  # the same key again (another process would do the same): replaced
    assert os.listdir(store.path(KEY).parent) == [f"{KEY}.npy"]


def test_content_key(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "img.jpg").write_bytes(b"same bytes")
    (tmp_path / "b" / "copy.png").write_bytes(b"same bytes")
    (tmp_path / "other.jpg").write_bytes(b"other bytes")
    k = content_key(tmp_path / "a" / "img.jpg")
    assert k == hashlib.sha256(b"same bytes").hexdigest()
    assert FeatureStore.content_key(str(tmp_path / "b" / "copy.png")) == k
    assert content_key(tmp_path / "other.jpg") not in (None, k)
    assert content_key(tmp_path / "missing.jpg") is None
    assert content_key(tmp_path / "a") is None


def test_content_key_of_fifo_does_not_block(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert content_key(fifo) is None


@pytest.mark.parametrize("bad", ["../x", "../../../../etc/passwd", "0123456789ABCDEF", "abc", "a" * 65, "", "g" * 16])
def test_invalid_vision_key(tmp_path, bad):
    with pytest.raises(ValueError, match="vision key"):
        FeatureStore(tmp_path, bad, SHAPE)


@pytest.mark.parametrize("bad", ["../" + "a" * 61, KEY.upper(), KEY[:63], KEY + "0", "", "/" + KEY[1:]])
def test_invalid_content_key(tmp_path, bad):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    with pytest.raises(ValueError, match="content key"):
        store.get(bad)
    with pytest.raises(ValueError, match="content key"):
        store.put(bad, feats())


@pytest.mark.parametrize("bad", [torch.zeros(4, 9), torch.zeros(8, 4), torch.zeros(32), torch.zeros(1, 4, 8)])
def test_put_wrong_shape(tmp_path, bad):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    with pytest.raises(ValueError, match="shape"):
        store.put(KEY, bad)
    with pytest.raises(ValueError, match="shape"):
        store.put(KEY, np.zeros(SHAPE, np.float32))
    assert not store.directory.exists()


def _npy_bytes(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _damage(kind: str, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    good = _npy_bytes(feats().numpy())
    if kind == "truncated":
        path.write_bytes(good[: len(good) - 10])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(good)))
    elif kind == "wrong shape":
        path.write_bytes(_npy_bytes(np.zeros((8, 4), np.float32)))
    elif kind == "float64":
        path.write_bytes(_npy_bytes(np.zeros(SHAPE, np.float64)))
    elif kind == "nan":
        arr = np.zeros(SHAPE, np.float32)
        arr[1, 2] = np.nan
        path.write_bytes(_npy_bytes(arr))
    elif kind == "too large":
        path.write_bytes(good + b"\0" * 8192)
    elif kind == "pickle":
        marker = path.parent / "unpickled"
        obj = np.array([_Boom(str(marker))], dtype=object)
        path.write_bytes(_npy_bytes(obj, allow_pickle=True))
    elif kind == "directory":
        path.mkdir()
    else:  # pragma: no cover
        raise AssertionError(kind)


class _Boom:
    """Unpickling this touches a file: proof that a pickle in the cache was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "kind", ["truncated", "random", "wrong shape", "float64", "nan", "too large", "pickle", "directory"]
)
def test_damaged_entry_is_a_miss_warned_and_removed(tmp_path, kind):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    path = store.path(KEY)
    _damage(kind, path)
    with pytest.warns(RuntimeWarning, match=r"feature cache: .*\.npy: .*; ignored, removed$") as rec:
        assert store.get(KEY) is None
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert not path.exists()
    assert not (path.parent / "unpickled").exists()
    store.put(KEY, feats(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(store.get(KEY), feats(2))


def test_fifo_entry_does_not_block(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    path = store.path(KEY)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.warns(RuntimeWarning, match="FIFO"):
        assert store.get(KEY) is None
    store.put(KEY, feats())  # os.replace puts a file in its place
    assert torch.equal(store.get(KEY), feats())


def test_unwritable_root_warns_once(tmp_path):
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"a file where the cache should be")
    store = FeatureStore(root, VKEY, SHAPE)
    with pytest.warns(RuntimeWarning, match="disk cache is off") as rec:
        store.put(KEY, feats())
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.put(KEY, feats())
        store.put(hashlib.sha256(b"other").hexdigest(), feats())
        assert store.get(KEY) is None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory_warns_and_leaves_no_temp(tmp_path):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    store.path(KEY).parent.mkdir(parents=True)
    store.path(KEY).parent.chmod(0o555)
    try:
        with pytest.warns(RuntimeWarning, match="disk cache is off"):
            store.put(KEY, feats())
        assert os.listdir(store.path(KEY).parent) == []
    finally:
        store.path(KEY).parent.chmod(0o755)


def test_put_refuses_non_finite(tmp_path):
    store = FeatureStore(tmp_path, VKEY, SHAPE)
    bad = feats()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        store.put(KEY, bad)
    assert store.get(KEY) is None


def test_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert from_env(VKEY, SHAPE) is None
    monkeypatch.setenv(ENV, "")
    assert from_env(VKEY, SHAPE) is None
    monkeypatch.setenv(ENV, str(tmp_path))
    store = from_env(VKEY, SHAPE)
    assert isinstance(store, FeatureStore)
    assert store.root == tmp_path and store.directory == tmp_path / VKEY and store.shape == SHAPE


def test_default_root_sets_the_store_only_where_the_user_did_not(tmp_path, monkeypatch):
    monkeypatch.delenv(fs.ENV, raising=False)
    with fs.default_root(tmp_path / "demo") as root:
        assert root == tmp_path / "demo" and os.environ[fs.ENV] == str(tmp_path / "demo")
    assert fs.ENV not in os.environ  # restored
    monkeypatch.setenv(fs.ENV, str(tmp_path / "mine"))
    with fs.default_root(tmp_path / "demo") as root:
        assert root == tmp_path / "mine"  # the user's choice wins
    assert os.environ[fs.ENV] == str(tmp_path / "mine")
    monkeypatch.setenv(fs.ENV, "")
    with fs.default_root(tmp_path / "demo") as root:
        assert root is None  # empty: the user turned the disk store off
