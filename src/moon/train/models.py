"""Creating the embedder to train from a spec string, and switching its tuning mode."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from moon.errors import ConfigError
from moon.train.config import ModelConfig

_TRAINABLE = ("build_product_inputs", "build_query_inputs", "collate", "forward", "aux_loss", "save_pretrained")


def build_model(spec: str, overrides: dict[str, Any] | None = None, *, allow_python: bool = False) -> Any:
    """The embedder named by ``spec``, as a trainable ``torch.nn.Module``.

    * ``moon-*`` presets and directories → ``MoonEmbedder.from_pretrained(spec, **overrides)``
      (a directory saved by another family is loaded through ``load_embedder``);
    * ``py:package.module:factory`` → ``factory(**overrides)`` (plug in your own model) — imports and
      runs that code, so only with ``allow_python=True``, which callers pass for a spec from the
      user's own command line or config, never for one read from a data file (an index manifest, a
      run directory, a store);
    * anything else (``dual-encoder``, ``pretrained-towers``, ``family:DIR``) →
      ``moon.models.load_embedder(spec, **overrides)``.

    Raises :class:`ConfigError` when the result cannot be trained (not a TrainableEmbedder).
    """
    overrides = dict(overrides or {})
    if spec.startswith("py:"):
        if not allow_python:
            raise ConfigError(
                f"model.spec {spec!r}: a py: spec runs Python code; it is accepted only from your own "
                "command line or training config, not from a data file"
            )
        module_name, _, attr = spec[3:].partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"model.spec {spec!r}: cannot import {module_name}:{attr} ({exc})") from exc
        model = factory(**overrides)
    else:
        from moon.models import load_embedder, saved_family

        is_dir = Path(spec).is_dir()
        family = saved_family(spec) if is_dir else None
        if spec.startswith("moon-") or (is_dir and family in (None, "moon")):
            from moon.model import MoonEmbedder

            model = MoonEmbedder.from_pretrained(spec, **overrides)
        else:
            model = load_embedder(spec, **overrides)
    missing = [m for m in _TRAINABLE if not hasattr(model, m)]
    if missing or not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model.spec {spec!r}: {type(model).__name__} is not trainable (needs a torch.nn.Module with {', '.join(_TRAINABLE)}; missing {', '.join(missing) or 'nn.Module'})"
        )
    return model


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
