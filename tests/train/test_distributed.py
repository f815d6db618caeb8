"""Done-criterion 1: two gloo processes on a global batch = one process on it (loss and gradients)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, store: str, out: str) -> None:
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from helpers import gradients_after_two_steps

        from moon.train.distributed import context_from_group

        losses, grads = gradients_after_two_steps(Path(store), ctx=context_from_group())
        torch.save({"losses": losses, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(small_store, tmp_path):
    from helpers import gradients_after_two_steps, max_relative_difference

    mp.start_processes(_worker, args=(2, _free_port(), str(small_store), str(tmp_path)), nprocs=2, start_method="spawn")
    ref_losses, ref_grads = gradients_after_two_steps(small_store)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for a, b in zip(got["losses"], ref_losses, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b)
        assert max_relative_difference(got["grads"], ref_grads) <= 1e-5
    # the run must have exercised every negative source: the queue is non-empty at step 1
    assert ref_grads["log_scale"].abs() > 0
