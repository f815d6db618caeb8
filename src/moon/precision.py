"""Which float precision to compute in: bfloat16 where the hardware runs it natively, else float32.

``resolve_bf16("auto", device)`` is True on CUDA and on CPUs whose oneDNN reports native bfloat16
(AVX-512 BF16 or AMX), False elsewhere — on other CPUs bfloat16 is emulated and slower than float32.
``MOON_FP32=1`` in the environment forces float32 everywhere (for bit-exact comparisons across machines).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def _cpu_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix maths natively (and ``MOON_FP32`` is not set)."""
    return os.environ.get("MOON_FP32") != "1" and _cpu_bf16()


def resolve_bf16(precision: str, device: Any) -> bool:
    """``auto`` / ``fp32`` / ``bf16`` on ``device`` → whether to run under bfloat16 autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or os.environ.get("MOON_FP32") == "1":
        return False
    if precision == "bf16":
        return True
    return str(getattr(device, "type", device)) == "cuda" or (
        str(getattr(device, "type", device)) == "cpu" and _cpu_bf16()
    )


def autocast(precision: str, device: Any):
    """A bfloat16 autocast context when :func:`resolve_bf16` says so, else a no-op context."""
    import torch

    dev_type = str(getattr(device, "type", device))
    if resolve_bf16(precision, device):
        return torch.autocast(device_type=dev_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
