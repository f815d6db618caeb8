"""Typed training configuration: YAML in and out, ``key=value`` overrides, presets, validation.

A config has six sections (see ``configs/*.yaml`` and ``docs/training.md``)::

    model:     spec, overrides, lora, freeze_vision, freeze_lower_layers, gradient_checkpointing
    data:      dir, crop_source, modality_mix, val_max_queries
    negatives: in_batch, hard, spatial, queue_size, queue_max_age, guard
    loss:      temperature, learn_temperature, symmetric, aux_weight
    optim:     steps, batch_size, chunk_size, lr, lr_scale, weight_decay, warmup_steps, min_lr_ratio, grad_clip
    run:       out, seed, device, precision, strategy, log_every, val_every, val_at_start, ckpt_every,
               keep_last, tensorboard, progress

Every error (unknown key, wrong type, value out of range, missing data directory) is a
:class:`moon.errors.ConfigError` raised by :func:`validate_config` before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moon.errors import ConfigError

MODALITIES = ("image", "text", "multimodal")


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None


@dataclass
class ModelConfig:
    """Which embedder to train: a spec string for :func:`moon.models.load_embedder` plus tuning switches."""

    spec: str = "moon-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig | None = None
    freeze_vision: bool = False
    freeze_lower_layers: int = 0  # token embeddings + the first N decoder layers get no gradient
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """The product store and how training batches are drawn from it."""

    dir: str | None = None
    crop_source: str | None = None
    modality_mix: dict[str, float] = field(default_factory=lambda: {"image": 12.0, "text": 3.0, "multimodal": 2.0})
    val_max_queries: int = 500


@dataclass
class NegativesConfig:
    """Negative sources, each switchable for ablation (PAPER.md §5)."""

    in_batch: bool = True
    hard: int = 0
    spatial: bool = True
    queue_size: int = 0
    queue_max_age: int = 8
    guard: bool = True


@dataclass
class LossConfig:
    temperature: float = 0.05
    learn_temperature: bool = False
    symmetric: bool = False
    aux_weight: float = 1.0  # multiplies model.aux_loss() (MoonEmbedder already applies moe_aux_weight)


@dataclass
class OptimConfig:
    steps: int = 100
    batch_size: int = 17
    chunk_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    # parameter-name regex -> learning-rate factor, first match wins (e.g. {"projector": 10})
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class RunConfig:
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 1
    val_every: int = 0
    val_at_start: bool = False
    ckpt_every: int = 50
    keep_last: int = 2
    tensorboard: bool = True
    progress: bool = True
    strategy: str = "ddp"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Presets for `moon train --preset NAME` (configs/train-*.yaml spell the same recipes out; a test
# checks they agree).
PRESETS: dict[str, dict[str, Any]] = {
    "moon-tiny": {
        "model": {"spec": "moon-tiny"},
        "negatives": {"hard": 1, "queue_size": 64, "queue_max_age": 4},
        "optim": {"steps": 60, "batch_size": 17, "lr": 5e-4, "warmup_steps": 5},
        "run": {"val_every": 20, "ckpt_every": 20, "keep_last": 2},
    },
    "moon-small": {
        "model": {"spec": "moon-small"},
        "negatives": {"hard": 2, "queue_size": 256, "queue_max_age": 8},
        "optim": {"steps": 300, "batch_size": 34, "chunk_size": 17, "lr": 3e-4, "warmup_steps": 20},
        "run": {"val_every": 50, "ckpt_every": 50, "keep_last": 2},
    },
    "moon-3b": {
        "model": {
            "spec": "moon-3b",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None},
            "freeze_vision": True,
            "gradient_checkpointing": True,
        },
        "negatives": {"hard": 4, "queue_size": 65536, "queue_max_age": 32},
        "loss": {"learn_temperature": True},
        "optim": {"steps": 20000, "batch_size": 1024, "chunk_size": 32, "lr": 1e-4, "warmup_steps": 500},
        "run": {"precision": "bf16", "val_every": 1000, "ckpt_every": 500, "keep_last": 3},
    },
}

_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return False, tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value to the declared field type (ints accepted for floats)."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(inner, value, where)
    origin = typing.get_origin(inner)
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(inner)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(inner)
        if val_tp is Any:
            return dict(value)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    return value


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(hints)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()})


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _normalise(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept the ``model: moon-small`` shorthand and reject non-mapping sections."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(raw).__name__}")
    out = dict(raw)
    if isinstance(out.get("model"), str):
        out["model"] = {"spec": out["model"]}
    for name, value in out.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section {name!r}; known sections: {', '.join(_SECTIONS)}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {value!r}")
    return {k: v for k, v in out.items() if v is not None}


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=3e-4"`` → ``{"optim": {"lr": 0.0003}}`` (the value is parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. optim.lr=3e-4)")
    parts = key.strip().split(".")
    if parts[0] == "model" and len(parts) == 1:
        parts = ["model", "spec"]
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    except RecursionError as exc:
        raise ConfigError(f"override {text[:40]!r}…: value nested too deeply") from exc
    parsed = _fix_yaml_floats(parsed) if isinstance(parsed, (dict, list)) else parsed
    if isinstance(parsed, str) and "e" in parsed.lower():  # YAML 1.1 reads 3e-4 as a string
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = parsed
    return out


# a config is a few hundred values; YAML aliases can make a small file expand to billions
MAX_CONFIG_VALUES = 100_000


def _fix_yaml_floats(obj: Any, budget: list[int] | None = None) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; turn such strings back into floats.

    Raises :class:`ConfigError` past :data:`MAX_CONFIG_VALUES` values (an alias bomb)."""
    budget = budget if budget is not None else [MAX_CONFIG_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"the config expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases?)")
    if isinstance(obj, dict):
        return {k: _fix_yaml_floats(v, budget) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_yaml_floats(v, budget) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj.lower() for c in "e") and obj.strip()[0] in "0123456789.-+":
                return float(obj)
        except (ValueError, IndexError):
            return obj
    return obj


MAX_CONFIG_BYTES = 1 << 20


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's sections (``yaml.safe_load``: plain data, never objects).

    Raises :class:`ConfigError` for a missing, oversized, non-UTF-8, invalid or too deeply nested file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})"
        ) from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    except RecursionError as exc:
        raise ConfigError(f"{p}: nested too deeply to be a config") from exc
    return _normalise(_fix_yaml_floats(raw), str(p))


def load_config(
    path: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> TrainConfig:
    """Build a config: preset, then the YAML file, then ``key=value`` overrides, then ``extra``.

    Raises :class:`ConfigError` for unknown presets/keys, wrong types or invalid values.
    """
    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        raw = _deep_merge(raw, PRESETS[preset])
    if path is not None:
        raw = _deep_merge(raw, read_yaml(path))
    for text in overrides:
        raw = _deep_merge(raw, _normalise(parse_override(text), f"override {text!r}"))
    if extra:
        raw = _deep_merge(raw, _normalise(extra, "options"))
    config = _build(TrainConfig, raw, "")
    validate_config(config)
    return config


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """The inverse of :meth:`TrainConfig.to_dict` (validated)."""
    config = _build(TrainConfig, _normalise(raw, "config"), "")
    validate_config(config)
    return config


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# upper bounds: far above every recipe (the 3B one: batch 1024, queue 65,536), low enough that a
# typo (optim.batch_size=1e20) is refused instead of allocating or looping forever.
MAX_STEPS = 10**8 - 1  # checkpoint directories are named step-XXXXXXXX (8 digits)
MAX_BATCH = 1 << 20
MAX_QUEUE = 1 << 22
MAX_HARD = 1024
MAX_SEED = 2**32 - 1


def _range(value: int | None, low: int, high: int, name: str, *, empty: str = "") -> None:
    if value is None:
        return
    _check(low <= value <= high, f"{name}: must be in [{low:,}, {high:,}]{empty}, got {value:,}")


def validate_config(config: TrainConfig, *, check_paths: bool = False) -> None:
    """Range and consistency checks; with ``check_paths`` also that the data directory is a store."""
    m, d, n, lo, o, r = config.model, config.data, config.negatives, config.loss, config.optim, config.run
    _check(bool(m.spec.strip()), "model.spec: must name a model (moon-tiny, moon-small, dual-encoder, a directory …)")
    _check(m.freeze_lower_layers >= 0, f"model.freeze_lower_layers: must be >= 0, got {m.freeze_lower_layers}")
    if m.lora is not None:
        _range(m.lora.r, 1, 65536, "model.lora.r")
        _check(m.lora.alpha > 0, f"model.lora.alpha: must be > 0, got {m.lora.alpha}")
        _check(0.0 <= m.lora.dropout < 1.0, f"model.lora.dropout: must be in [0, 1), got {m.lora.dropout}")
    unknown = sorted(set(d.modality_mix) - set(MODALITIES))
    _check(
        not unknown,
        f"data.modality_mix: unknown modality {unknown[0] if unknown else ''!r}; use {', '.join(MODALITIES)}",
    )
    _check(
        all(v >= 0 for v in d.modality_mix.values()), f"data.modality_mix: weights must be >= 0, got {d.modality_mix}"
    )
    _check(sum(d.modality_mix.values()) > 0, "data.modality_mix: at least one weight must be > 0")
    _check(
        d.crop_source in (None, "learned", "truth", "saliency", "grounding"),
        f"data.crop_source: unknown source {d.crop_source!r}",
    )
    _check(d.val_max_queries > 0, f"data.val_max_queries: must be > 0, got {d.val_max_queries}")
    _range(n.hard, 0, MAX_HARD, "negatives.hard")
    _range(n.queue_size, 0, MAX_QUEUE, "negatives.queue_size")
    _check(n.queue_max_age >= 0, f"negatives.queue_max_age: must be >= 0, got {n.queue_max_age}")
    _check(lo.temperature > 0, f"loss.temperature: must be > 0, got {lo.temperature}")
    _check(lo.aux_weight >= 0, f"loss.aux_weight: must be >= 0, got {lo.aux_weight}")
    _range(o.steps, 1, MAX_STEPS, "optim.steps")
    _range(o.batch_size, 1, MAX_BATCH, "optim.batch_size")
    _range(o.chunk_size, 1, MAX_BATCH, "optim.chunk_size", empty=" or empty")
    _check(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    _range(o.warmup_steps, 0, MAX_STEPS, "optim.warmup_steps")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip: must be > 0 or empty, got {o.grad_clip}")
    _check(
        isinstance(o.lr_scale, dict),
        f"optim.lr_scale: must be a mapping of name patterns to factors, got {o.lr_scale!r}",
    )
    for pattern, factor in o.lr_scale.items():
        try:
            re.compile(str(pattern))
        except re.error as exc:
            raise ConfigError(f"optim.lr_scale: {pattern!r} is not a regular expression ({exc})") from exc
        _check(
            isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor <= 1e4,
            f"optim.lr_scale.{pattern}: factor must be a number in (0, 10000], got {factor!r}",
        )
    _check(r.device in ("auto", "cpu", "cuda"), f"run.device: must be auto, cpu or cuda, got {r.device!r}")
    _check(r.precision in ("auto", "fp32", "bf16"), f"run.precision: must be auto, fp32 or bf16, got {r.precision!r}")
    _check(r.strategy in ("ddp", "fsdp"), f"run.strategy: must be ddp or fsdp, got {r.strategy!r}")
    _range(r.seed, 0, MAX_SEED, "run.seed")
    _check(r.log_every > 0, f"run.log_every: must be > 0, got {r.log_every}")
    _check(r.val_every >= 0, f"run.val_every: must be >= 0 (0 = off), got {r.val_every}")
    _check(r.ckpt_every >= 0, f"run.ckpt_every: must be >= 0 (0 = only at the end), got {r.ckpt_every}")
    _check(r.keep_last >= 1, f"run.keep_last: must be >= 1, got {r.keep_last}")
    if check_paths:
        _check(d.dir is not None, "data.dir: no product store given (use --data DIR or data.dir=DIR)")
        assert d.dir is not None
        _check(Path(d.dir).is_dir(), f"data.dir: {d.dir} is not a directory")
        _check(
            (Path(d.dir) / "manifest.json").is_file(), f"data.dir: {d.dir} is not a product store (no manifest.json)"
        )
        _check(r.out is not None, "run.out: no run directory given (use --out RUN_DIR or run.out=DIR)")
        if r.device == "cuda":  # checked at start (a config may be written on another machine)
            import torch

            _check(
                torch.cuda.is_available(),
                "run.device=cuda: this machine has no usable CUDA device (torch.cuda.is_available() is false); "
                "use run.device=cpu or auto",
            )
