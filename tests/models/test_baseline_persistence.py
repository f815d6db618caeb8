"""A saved baseline's embedder.json is read with the bounded reader: one-line errors, never a hang."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from moon.errors import ConfigError
from moon.models import EMBEDDER_FILE
from moon.models.baselines.persistence import WEIGHTS_FILE, read_saved_config


def _saved(tmp_path, meta_bytes: bytes | None):
    d = tmp_path / "model"
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / WEIGHTS_FILE))
    if meta_bytes is not None:
        (d / EMBEDDER_FILE).write_bytes(meta_bytes)
    return d


def test_a_good_file_reads(tmp_path):
    d = _saved(tmp_path, json.dumps({"family": "two-tower", "config": {"dim": 8}}).encode())
    config, tensors = read_saved_config(d, "two-tower")
    assert config == {"dim": 8} and set(tensors) == {"w"}


@pytest.mark.parametrize(
    "bad",
    [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]", b"[" * 100_000 + b"]" * 100_000, b'{"family": 3}'],
    ids=["not-utf8", "not-json", "a-list", "deep", "family-not-text"],
)
def test_a_damaged_file_is_a_one_line_error(tmp_path, bad):
    d = _saved(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        read_saved_config(d, "two-tower")
    assert "\n" not in str(info.value) and EMBEDDER_FILE in str(info.value)
    assert (d / EMBEDDER_FILE).read_bytes() == bad  # left as it was


def test_a_fifo_is_refused_without_blocking(tmp_path, within):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    d = _saved(tmp_path, None)
    os.mkfifo(d / EMBEDDER_FILE)
    with pytest.raises(ConfigError, match=EMBEDDER_FILE):
        within(20, lambda: read_saved_config(d, "two-tower"))
