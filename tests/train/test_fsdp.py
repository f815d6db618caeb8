"""FSDP (``run.strategy: fsdp``): 2 gloo processes with sharded moon-tiny train exactly like 2 DDP
processes (which equal 1 process: test_distributed.py), and a sharded run resumes exactly.

Why not compare with 1 process directly: with moon-tiny, a rank's half batch pads to other lengths
and groups MoE tokens differently, which moves the step-1 loss by ~7e-5 relative under DDP as well
(float32 rounding); FSDP vs DDP on the same 2 processes isolates what sharding changes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).parent
STEPS = 3
LR, WEIGHT_DECAY = 1e-3, 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(store: Path, out: Path, steps: int = STEPS, strategy: str = "fsdp"):
    from moon.train import load_config

    return load_config(
        extra={
            "model": {"spec": "moon-tiny", "overrides": {"max_images": 1, "max_text_tokens": 32}},
            "data": {"dir": str(store)},
            "negatives": {"hard": 1, "queue_size": 8, "queue_max_age": 2},
            "optim": {"steps": steps, "batch_size": 4, "warmup_steps": 0, "lr": LR, "weight_decay": WEIGHT_DECAY},
            "run": {
                "out": str(out),
                "strategy": strategy,
                "val_every": 0,
                "ckpt_every": 1,
                "keep_last": 5,
                "tensorboard": False,
                "progress": False,
            },
        }
    )


def _worker(rank: int, world: int, port: int, store: str, out: str, steps: int, resume: bool, strategy: str) -> None:
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from moon.train import train
        from moon.train.distributed import context_from_group

        train(_config(Path(store), Path(out), steps, strategy), resume=resume, ctx=context_from_group())
    finally:
        dist.destroy_process_group()


def _spawn(store: Path, out: Path, steps: int = STEPS, resume: bool = False, strategy: str = "fsdp") -> None:
    mp.start_processes(
        _worker, args=(2, _free_port(), str(store), str(out), steps, resume, strategy), nprocs=2, start_method="spawn"
    )


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to what float32 arithmetic allows, on any CPU.

    The two runs do the same maths with sums in another order (reduce-scatter + all-gather vs
    all-reduce; a CPU's SIMD width changes the order again), so gradients differ by rounding. For
    most tensors that is ~1e-7 relative, but a gradient that nearly cancels has a rounding error as
    large as itself: the softmax ignores a bias added to every key, so ``k_proj.bias`` only gets
    what RoPE leaves over. AdamW divides each gradient by its own running size, so any gradient,
    however imprecise, moves a weight by up to about ``lr`` per step; the only bound that holds on
    every machine is that travel. ``atol`` is 1 % of it (0.01 * lr * steps = 3e-5; measured worst:
    ``k_proj.bias``, ~5e-7 on AVX-512, ~1.2e-6 on another AVX-512 EPYC): a real sharding bug -- a
    gradient not reduced, a shard not updated, a step skipped -- moves weights by O(lr), 100x more.
    ``rtol``: an expert that got no token has no gradient under FSDP (AdamW skips it) but a zero
    one under DDP (AdamW decays it), a relative difference of at most weight_decay * lr * steps.
    """
    atol, rtol = 0.01 * LR * STEPS, 2 * WEIGHT_DECAY * LR * STEPS
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.slow
def test_sharded_processes_train_like_ddp_and_resume_exactly(small_store, tmp_path):
    from moon.train.fsdp import block_names

    replicated = tmp_path / "ddp"
    _spawn(small_store, replicated, strategy="ddp")
    sharded = tmp_path / "sharded"
    _spawn(small_store, sharded)

    ref, got = _losses(replicated), _losses(sharded)
    assert len(got) == STEPS and max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) <= 1e-5
    init = _weights(replicated)
    _assert_same_weights(_weights(sharded), init)
    # training moved the weights (the comparison above is not between two untouched models)
    from moon.model import MoonEmbedder

    fresh = MoonEmbedder.from_pretrained("moon-tiny", max_images=1, max_text_tokens=32).plain_state_dict()
    assert any(not torch.allclose(fresh[k], init[k]) for k in init)
    # the blocks were sharded one by one: decoder layers and vision blocks
    names = block_names(MoonEmbedder.from_pretrained("moon-tiny"))
    assert any(".layers." in n for n in names) and any(".blocks." in n for n in names)

    # checkpoints hold full (unsharded) states; drop the last one and resume from step 2 → the same
    # step 3 and the same final weights as the straight run
    import shutil

    part = tmp_path / "resumed"
    shutil.copytree(sharded, part)
    shutil.rmtree(part / "checkpoints" / "step-00000003")
    shutil.rmtree(part / "final")
    _spawn(small_store, part, resume=True)
    assert [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert max(abs(a - b) / abs(b) for a, b in zip(_losses(part), got, strict=True)) <= 1e-5
    _assert_same_weights(_weights(part), _weights(sharded))


def test_fsdp_refuses_a_learnable_temperature(small_store, tmp_path):
    from moon.errors import ConfigError
    from moon.train import train

    cfg = _config(small_store, tmp_path / "run")
    cfg.loss.learn_temperature = True
    with pytest.raises(ConfigError, match="learn_temperature"):
        train(cfg)
