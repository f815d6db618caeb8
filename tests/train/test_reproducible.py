"""Same seed, config and thread count → the same training, bit for bit.

One run here, one in a fresh Python process with another ``PYTHONHASHSEED``, so neither set/dict
ordering of strings nor anything left over in one interpreter can make the two agree by luck.
(Another thread count may change the last bits: BLAS splits reductions differently; README.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RUN = r"""
import sys
import torch
torch.set_num_threads(int(sys.argv[3]))
from moon.train import load_config, train
cfg = load_config(extra={
    "model": {"spec": "moon-tiny"},
    "data": {"dir": sys.argv[1]},
    "negatives": {"hard": 1, "queue_size": 16},
    "optim": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
    "run": {"out": sys.argv[2], "val_every": 2, "ckpt_every": 0, "tensorboard": False, "progress": False},
})
train(cfg)
"""


def _records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for r in records:
        r.pop("samples_per_s", None)  # wall-clock speed, the one thing that may differ
    return records


def test_same_seed_config_and_threads_give_identical_training(tmp_path, monkeypatch, store_factory):
    threads = min(2, os.cpu_count() or 1)  # 2 where there are 2 cores: threads that could race
    store = store_factory(tmp_path / "store", n_products=24, n_queries=80)
    monkeypatch.setenv("MOON_PROGRESS", "off")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        namespace = {"__name__": "run"}
        monkeypatch.setattr(sys, "argv", ["run", str(store), str(tmp_path / "a"), str(threads)])
        exec(RUN, namespace)  # the same script, in this process
    finally:
        torch.set_num_threads(before)
    other_hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": other_hash_seed, "MOON_PROGRESS": "off"}
    res = subprocess.run(
        [sys.executable, "-c", RUN, str(store), str(tmp_path / "b"), str(threads)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert any("val_recall@10" in r for r in a)  # validation ran, and is compared too
    assert a == b  # exact: losses, negatives, chance level, cosine, gradient norms, validation
    assert (tmp_path / "a" / "final" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "final" / "model.safetensors"
    ).read_bytes()
