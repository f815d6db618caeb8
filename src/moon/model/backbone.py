"""Qwen-VL backbones from presets, local directories or hub ids.

The backbone is the transformers *base* model (``Qwen2_5_VLModel`` …: vision tower + decoder, no
LM head). Checkpoints saved as ``…ForConditionalGeneration`` load into it as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moon.errors import ConfigError
from moon.model.config import PRESETS

#: transformers ``model_type`` → (config class, base model class), resolved lazily.
SUPPORTED = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLModel"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLModel"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLModel"),
}


def hf_reason(exc: BaseException) -> str:
    """A transformers loading error as one short line. Its messages span lines and point at hub
    URLs; the one for a checkpoint that needs its own Python code (``auto_map`` in its config,
    refused because MOON passes ``trust_remote_code=False``) is put in MOON's words."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "trust_remote_code" in text:
        return (
            "it needs its own Python code (auto_map in its config), which MOON never runs when loading "
            "a model; load it with a family that takes --trust-remote-code, or use a standard architecture"
        )
    return text if len(text) <= 300 else text[:299] + "…"


def _classes(model_type: str):
    import transformers

    if model_type not in SUPPORTED:
        raise ConfigError(f"backbone model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    cfg_name, model_name = SUPPORTED[model_type]
    if not hasattr(transformers, model_name):
        raise ConfigError(f"the installed transformers {transformers.__version__} has no {model_name}")
    return getattr(transformers, cfg_name), getattr(transformers, model_name)


def backbone_config_from_dict(data: dict[str, Any]):
    """A transformers config from a dict with ``model_type``."""
    data = dict(data)
    cfg_cls, _ = _classes(data.pop("model_type", "qwen2_5_vl"))
    return cfg_cls(**data)


def preset_backbone_config(name: str):
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if PRESETS[name].backbone is None:
        raise ConfigError(f"preset {name!r} is a {PRESETS[name].family} preset, not a Qwen-VL backbone config")
    return backbone_config_from_dict(PRESETS[name].backbone)


def build_backbone(config, *, seed: int, device: str | torch.device | None = None) -> nn.Module:
    """A randomly initialised, seeded base model from a config (``device="meta"``: no memory)."""
    _, model_cls = _classes(config.model_type)
    config._attn_implementation = "sdpa"
    if str(device) == "meta":
        with torch.device("meta"):
            return model_cls(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float()


def is_local_dir(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).is_dir()


def checkpoint_model_type(name_or_path: str) -> str:
    """The transformers ``model_type`` of a checkpoint directory or hub id (its config only)."""
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=False).model_type)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{name_or_path}: not a preset ({', '.join(PRESETS)}), not a saved MOON directory and not a loadable "
            f"transformers checkpoint ({hf_reason(exc)})"
        ) from exc


def load_backbone(name_or_path: str, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A pretrained base model from a local directory or a hub id (transformers' own loader)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{name_or_path}: not a preset ({', '.join(PRESETS)}), not a saved MOON directory and not a loadable "
            f"Qwen-VL checkpoint ({hf_reason(exc)})"
        ) from exc
    _, model_cls = _classes(config.model_type)
    return model_cls.from_pretrained(
        str(name_or_path), dtype=dtype or torch.float32, attn_implementation="sdpa", trust_remote_code=False
    )


def language_model(backbone: nn.Module) -> nn.Module:
    """The decoder (text model) inside a base model, peft-wrapped or not."""
    base = base_model(backbone)
    lm = getattr(base, "language_model", None)
    if lm is None:
        raise TypeError(f"{type(base).__name__} has no language_model")
    return lm


def base_model(backbone: nn.Module) -> nn.Module:
    """Unwrap a peft ``PeftModel`` (or return the model itself)."""
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) else backbone
