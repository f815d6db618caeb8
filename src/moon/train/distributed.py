"""Process-group helpers: torchrun (env://) start-up, gathering with gradient, gradient averaging.

Single-process runs use the same code with ``world_size == 1`` (every collective is then a no-op).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moon.errors import TrainingError


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), if any.

    nccl on CUDA, gloo on CPU. Without those variables this is a single process.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", timeout=timedelta(minutes=30))
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"),
    )


def context_from_group() -> DistContext:
    """A context for an already initialised process group (tests start one themselves)."""
    if not dist.is_initialized():
        return DistContext()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=dist.get_rank())


class _GatherKeepLocalGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradients every rank computed for this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.world = dist.get_rank(), world
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(ctx.world, dim=0)[ctx.rank]


def gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``(n, d)`` per rank → ``(world*n, d)`` in rank order; gradient flows to the local slice.

    Every rank must pass the same ``n``. Each rank's loss only covers its own queries, so the
    backward sums the gradients all ranks computed for a slice: with the loss scaled by
    ``world_size`` and gradients averaged (:func:`average_gradients`), training equals one
    process on the global batch.
    """
    if not ctx.distributed:
        return x
    return _GatherKeepLocalGrad.apply(x)


def gather_detached(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All-gather without gradient (for the memory queue)."""
    if not ctx.distributed:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(value: float, ctx: DistContext) -> float:
    """Sum a Python number over ranks."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Average ``.grad`` over ranks in one flat buffer per dtype (missing grads count as zeros)."""
    if not ctx.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= ctx.world_size
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PeerFailedError(TrainingError):
    """Another process of the run failed to write a file it alone writes (rank 0's checkpoint,
    ``metrics.jsonl`` …): this process stopped too, instead of waiting at the next collective forever."""


@contextlib.contextmanager
def shared_outcome(ctx: DistContext, what: str) -> Iterator[None]:
    """Make the outcome of a write that only some ranks do (``what``: e.g. ``"checkpoint step-00000004"``)
    every rank's outcome.

    One process: nothing changes, the error of the block (if any) is raised as it is. Several: a
    write error of the block (a :class:`~moon.errors.TrainingError` such as ``CheckpointWriteError`` /
    ``RunFileWriteError``, or an ``OSError``) is held, then every rank takes part in one small
    all-reduce (a 0/1 flag per rank; it also serves as the barrier after the write) and, if any rank
    failed, every rank raises: the failing rank its own error, the others a one-line
    :class:`PeerFailedError` naming the rank. Other exceptions are not caught (bugs keep their
    tracebacks)."""
    if not ctx.distributed:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except (TrainingError, OSError) as exc:
        error = exc
    flags = torch.zeros(ctx.world_size, dtype=torch.int32, device=ctx.device)
    if error is not None:
        flags[ctx.rank] = 1
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
    if error is not None:
        raise error
    if failed:
        ranks = " and ".join(f"rank {r}" for r in failed[:3]) + (" …" if len(failed) > 3 else "")
        raise PeerFailedError(
            f"{ranks} could not write {what} (its own error line says why and what was kept); "
            f"training stopped on all {ctx.world_size} processes"
        )
