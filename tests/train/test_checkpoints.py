"""Checkpoints: atomic (a half-written one is invisible), pruned to the last K, complete."""

from __future__ import annotations

import torch

from moon.train import checkpoints as ckpt
from moon.train.optim import lr_factor


def _write(run, step, keep_last=2):
    tmp = ckpt.begin_checkpoint(run, step)
    ckpt.write_rng(tmp, 0)
    return ckpt.finish_checkpoint(run, step, tmp, {"w": torch.tensor([float(step)])}, {"step": step}, keep_last)


def test_half_written_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    for step in (5, 10, 15):
        _write(tmp_path, step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 15]
    # a crash mid-write leaves only a .tmp directory (and maybe a partial file): not a checkpoint
    tmp = ckpt.begin_checkpoint(tmp_path, 20)
    (tmp / "model.safetensors").write_bytes(b"\x80partial")
    assert ckpt.latest_checkpoint(tmp_path)[0] == 15
    model, trainer, rng = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path)[1], rank=0)
    assert model["w"].item() == 15.0 and trainer["step"] == 15
    assert set(rng) == {"python", "numpy", "torch", "cuda"}
    # rewriting the same step (after a resume) replaces it cleanly
    _write(tmp_path, 20)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [15, 20]


def test_model_state_holds_only_what_training_changes():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    net[0].weight.requires_grad_(False)
    state = ckpt.model_state(net)
    assert "0.weight" not in state and "0.bias" in state and "1.running_mean" in state
    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ckpt.load_model_state(other, state)
    assert torch.equal(other[0].bias, net[0].bias)


def test_warmup_then_cosine():
    f = [lr_factor(s, total=10, warmup=2, min_ratio=0.1) for s in range(11)]
    assert f[0] == 1 / 3 and f[1] == 2 / 3 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    assert abs(f[10] - 0.1) < 1e-12
