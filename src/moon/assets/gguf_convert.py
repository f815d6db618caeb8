"""GGUF causal LM → a plain transformers safetensors directory.

transformers loads a GGUF file by dequantising it to float, but keeps the model in a slow packed form
and refuses ``save_pretrained``. The conversion builds a fresh model from the same config (without
``quantization_config``), loads the dequantised state dict into it (every key must match), and saves
weights (safetensors), config and tokenizer. It needs the ``gguf`` package; loading the result does not.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from moon.assets.registry import AssetMissingError


def load_gguf(gguf_dir: str | Path, gguf_name: str):
    """``(model, tokenizer)`` dequantised from a GGUF file by transformers (float32)."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise AssetMissingError("reading a GGUF file needs the gguf package: pip install gguf==0.19.0") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    with _quiet(hf_logging):
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    return model, tokenizer


@contextlib.contextmanager
def _quiet(hf_logging):
    """No transformers progress bars (dequantising, writing shards) in the middle of MOON's output."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_dir: str | Path, gguf_name: str, out: str | Path) -> Path:
    """Write ``out/`` (config.json, model.safetensors, tokenizer files) from ``gguf_dir/gguf_name``."""
    model, tokenizer = load_gguf(gguf_dir, gguf_name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)(config)
    result = fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
        raise RuntimeError(f"GGUF conversion: key mismatch {result}")
    fresh.tie_weights()
    out = Path(out)
    from transformers.utils import logging as hf_logging

    with _quiet(hf_logging):
        fresh.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
