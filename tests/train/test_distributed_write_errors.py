"""Hardening round two: a write that fails on one process of a multi-process run stops every process.

Rank 0 alone writes the run directory (checkpoints, ``metrics.jsonl``, ``best.json``, ``final/``);
each rank writes its own RNG state into a checkpoint. A write that failed on one rank used to raise
there only, while the others went on to the next collective (a barrier, the gradient all-reduce) and
waited for it forever. The outcome of each such write is now shared (one small all-reduce), so every
rank stops with a one-line error: the failing rank its own, the others ``rank N could not write …``.

Two gloo processes on the CPU run the hardening tests' 6-step toy run; the fault (``ENOSPC`` after a
partial write, as a real full disk does) is fed in inside the failing process, which stays in the
process group until the others are done (as NCCL sees it). Both processes must end well within
:data:`JOIN_TIMEOUT_S` (with the code before this change the others waited there until killed), with
the expected errors, and no ``final/`` written. Errors are compared by class name, so the test also
runs (and fails by timing out) against the code before this change.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).parent

#: generous: the whole run takes a few seconds; a hang is a join that never returns
JOIN_TIMEOUT_S = 120
ENOSPC_TEXT = "No space left on device"


def _partial_then_full(path: Path) -> None:
    path.write_bytes(b"\0" * 100)
    raise OSError(errno.ENOSPC, ENOSPC_TEXT)


def _inject(fault: str) -> None:
    """Feed ``fault`` in, in this process (each spawned process patches itself)."""
    import safetensors.torch

    from moon.train import checkpoints as ckpt
    from moon.train.metrics_log import MetricsLogger

    if fault in ("checkpoint-rank0", "rng-rank1"):
        target = "model.safetensors" if fault == "checkpoint-rank0" else "rng-rank1.safetensors"
        real = ckpt.save_file

        def save_file(tensors, filename, *args, **kwargs):
            path = Path(filename)
            if path.parent.name == "step-00000004.tmp" and path.name == target:
                _partial_then_full(path)
            return real(tensors, filename, *args, **kwargs)

        ckpt.save_file = save_file
    elif fault == "metrics-rank0":
        real_write = MetricsLogger._write

        def write(self, data: bytes) -> None:
            if data.startswith(b'{"step": 3,'):
                real_write(self, data[:10])
                raise OSError(errno.ENOSPC, ENOSPC_TEXT)
            real_write(self, data)

        MetricsLogger._write = write
    elif fault == "best-json-rank0":
        real_text = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == "best.json.tmp":
                real_text(self, data[:5], *args, **kwargs)
                raise OSError(errno.ENOSPC, ENOSPC_TEXT)
            return real_text(self, data, *args, **kwargs)

        Path.write_text = write_text
    elif fault == "final-rank0":
        real_save = safetensors.torch.save_file

        def save_final(tensors, filename, *args, **kwargs):
            if Path(filename).parent.name == "final.tmp":
                _partial_then_full(Path(filename))
            return real_save(tensors, filename, *args, **kwargs)

        safetensors.torch.save_file = save_final
    else:  # pragma: no cover
        raise AssertionError(fault)


def _worker(rank: int, world: int, init_file: str, store: str, run: str, fault: str, failing: int, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from helpers import toy_run_config

    from moon.errors import MoonError
    from moon.train import train
    from moon.train.distributed import context_from_group

    if rank == failing:
        _inject(fault)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            train(toy_run_config(Path(store), Path(run)), ctx=context_from_group())
            result: dict[str, str | None] = {"type": None, "message": None}
        except MoonError as exc:  # what the CLI prints as one `error: …` line
            result = {"type": type(exc).__name__, "message": str(exc)}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    # keep the process group open until every rank is done, as a process that is still alive does:
    # otherwise gloo sees this process leave and fails the others' next collective ("connection
    # closed by peer", a traceback), where NCCL waits for its timeout (30 minutes) — a hang
    deadline = time.monotonic() + 2 * JOIN_TIMEOUT_S
    while time.monotonic() < deadline and len(list(Path(out).glob("rank*.json"))) < world:
        time.sleep(0.05)
    # end here, without destroy_process_group: gloo's teardown while the other process tears down too
    # can abort ("terminate called without an active exception") a process that has done its work
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# fault: (the failing rank, its error class, the start of its message (the run folder as {run}), what the others say)
FAULTS = {
    "checkpoint-rank0": (
        0,
        "CheckpointWriteError",
        "disk full while writing checkpoint step-00000004 to {run}/checkpoints (about ",
        "checkpoint step-00000004",
    ),
    "rng-rank1": (
        1,
        "CheckpointWriteError",
        "disk full while writing checkpoint step-00000004 to {run}/checkpoints (about ",
        "checkpoint step-00000004",
    ),
    "metrics-rank0": (
        0,
        "RunFileWriteError",
        "disk full while writing {run}/metrics.jsonl (the record of step 3; ",
        "{run}/metrics.jsonl",
    ),
    "best-json-rank0": (
        0,
        "RunFileWriteError",
        "disk full while writing {run}/best.json (the best validation score, step 2; ",
        "best/ and best.json (step 2)",
    ),
    "final-rank0": (
        0,
        "CheckpointWriteError",
        "disk full while writing the model final/ to {run} (about ",
        "{run}/final/",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_write_failing_on_one_rank_stops_every_rank(fault, hardening_store, tmp_path):
    failing, error_type, start, what = FAULTS[fault]
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    spawn = multiprocessing.get_context("spawn")
    args = (2, str(tmp_path / "rendezvous"), str(hardening_store), str(run), fault, failing, str(out))
    procs = [spawn.Process(target=_worker, args=(rank, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert not hung, f"rank(s) {hung} still running {JOIN_TIMEOUT_S} s after rank {failing}'s write failed (a hang)"
    assert [p.exitcode for p in procs] == [0, 0]

    results = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)}
    own = results[failing]
    assert own["type"] == error_type, own
    assert own["message"].startswith(start.format(run=run)), own["message"]
    assert "then continue with --resume" in own["message"] and "\n" not in own["message"]
    other = results[1 - failing]
    assert other["type"] == "PeerFailedError", other
    assert other["message"] == (
        f"rank {failing} could not write {what.format(run=run)} (its own error line says why and what was kept); "
        "training stopped on all 2 processes"
    )
    # nothing half-written is left, the earlier checkpoints are intact, and no final/ was written
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    from moon.train import checkpoints as ckpt

    kept = {"best-json-rank0": [], "final-rank0": [2, 4, 6]}.get(
        fault, [2]
    )  # (best.json: step 2, before its checkpoint)
    found = ckpt.list_checkpoints(run)
    assert [s for s, _ in found] == kept
    assert not list(run.glob("checkpoints/*.tmp"))
    for _, path in found:
        ckpt.check_checkpoint(path)
