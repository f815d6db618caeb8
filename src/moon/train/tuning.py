"""Switching a model's tuning mode (LoRA, frozen parts, gradient checkpointing) as the config asks.

The model itself comes from :func:`moon.models.load_embedder` (``trainable=True``).
"""

from __future__ import annotations

from typing import Any

import torch

from moon.errors import ConfigError
from moon.train.config import ModelConfig


def build_trainable(spec: str, overrides: dict[str, Any] | None = None) -> Any:
    """The model ``config.model`` names, to be trained: :func:`moon.models.load_embedder` with
    ``trainable=True``. The spec comes from the user's own training config or command line (never
    from a run directory's saved ``config.yaml``, which is only compared), so a
    ``py:module:factory`` spec is honoured."""
    from moon.models import load_embedder

    return load_embedder(spec, trainable=True, overrides=overrides, allow_python=True)


def apply_tuning(model: Any, config: ModelConfig) -> None:
    """LoRA, frozen vision tower and gradient checkpointing, as the config asks.

    These need the model's own hooks (``enable_lora``, ``freeze_vision``, ``freeze_lower_layers``,
    ``gradient_checkpointing_enable``); a model without one raises :class:`ConfigError`.
    """

    def need(method: str, option: str) -> Any:
        fn = getattr(model, method, None)
        if fn is None:
            raise ConfigError(
                f"model.{option}: {type(model).__name__} has no {method}(); turn the option off for this model"
            )
        return fn

    if config.lora is not None:
        kwargs: dict[str, Any] = {"r": config.lora.r, "alpha": config.lora.alpha, "dropout": config.lora.dropout}
        if config.lora.target_modules:
            kwargs["target_modules"] = config.lora.target_modules
        try:
            need("enable_lora", "lora")(**kwargs)
        except TypeError:
            kwargs.pop("dropout")
            need("enable_lora", "lora")(**kwargs)
    if config.freeze_vision:
        need("freeze_vision", "freeze_vision")()
    if config.freeze_lower_layers:
        need("freeze_lower_layers", "freeze_lower_layers")(config.freeze_lower_layers)
    if config.gradient_checkpointing:
        need("gradient_checkpointing_enable", "gradient_checkpointing")()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
