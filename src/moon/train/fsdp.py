"""Fully sharded data parallel training (``run.strategy: fsdp``) with PyTorch's FSDP2 (``fully_shard``).

Every transformer block (each child of an ``nn.ModuleList`` whose class name ends in ``Layer`` or
``Block``: Qwen decoder layers — with their MoE — and vision blocks) becomes its own shard group,
then the root; parameters, gradients and optimizer states live sharded across the processes, and
gradients are averaged by FSDP's reduce-scatter (so the trainer's own all-reduce is skipped).

Checkpoints and ``RUN/final`` / ``RUN/best`` are written from *full* state dicts gathered onto
rank 0, so they load on any number of processes and with ``moon.load_embedder`` like DDP runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moon.train import checkpoints as ckpt
from moon.train.config import ModelConfig
from moon.train.distributed import DistContext


def block_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules sharded one by one (transformer layers and blocks)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                kind = type(child).__name__
                if kind.endswith("Layer") or kind.endswith("Block"):
                    names.append(f"{name}.{i}" if name else str(i))
    return names


def shard_model(model: nn.Module, ctx: DistContext) -> list[str]:
    """Apply ``fully_shard`` to each block and then to ``model`` itself (in place).

    Returns the sharded block names. Needs an initialised process group (torchrun).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    names = block_names(model)
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return names


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, *, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) state dict on rank 0 — a collective: every rank must call it.

    Rank 0 gets the tensors (only trainable parameters and buffers with ``trainable_only``, as
    :func:`moon.train.checkpoints.model_state`); the other ranks get ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    if not trainable_only or not state:
        return state
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names, gathered on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_states(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load full state dicts (every rank passes the same ones) into the sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    unexpected = [
        k for k in model_state if k not in dict(model.named_parameters()) and k not in dict(model.named_buffers())
    ]
    if unexpected:
        raise ValueError(f"checkpoint has weights the model lacks (different model config?): {unexpected[:3]}")
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=False))
    # strict=False: a parameter that never had a gradient yet (an expert no token reached) has no
    # Adam state — as in the optimizer that wrote the checkpoint
    set_optimizer_state_dict(
        model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def save_unsharded(
    model: nn.Module, directory: Path, spec_config: ModelConfig, ctx: DistContext, build: Any, tune: Any
) -> None:
    """Write ``model`` with ``save_pretrained`` from a full copy built on rank 0 (collective).

    ``build(spec, overrides)`` and ``tune(model, model_config)`` rebuild the same architecture
    (``moon.train.tuning.build_trainable`` / ``apply_tuning``); rank 0 holds a second, unsharded copy
    of the weights while writing.
    """
    state = full_model_state(model, trainable_only=False)
    if ctx.is_main:
        copy = build(spec_config.spec, spec_config.overrides)
        tune(copy, spec_config)
        copy.load_state_dict(state, strict=True)
        ckpt.save_pretrained_atomic(copy, directory)
