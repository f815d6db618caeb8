"""Bad saved-model directories: one-line errors, never a hang, a traceback or a trust prompt.

* ``embedder.json`` is read with the bounded reader (``moon.data.safe_open.read_json``): a FIFO,
  a huge file, deep nesting, non-UTF-8 bytes, non-JSON or a non-object is a one-line error naming it.
* every transformers load MOON does passes ``trust_remote_code=False``: a checkpoint whose config
  names its own Python code (``auto_map``) is refused with one line; the code never runs and
  transformers' interactive "run the custom code?" prompt never appears.
"""

from __future__ import annotations

import builtins
import json
import os

import pytest

from moon.data import Product, write_store
from moon.errors import ConfigError
from moon.model import MoonEmbedder
from moon.models import EMBEDDER_FILE, MAX_EMBEDDER_JSON_BYTES, load_embedder, saved_family


@pytest.fixture
def store(tmp_path):
    write_store(tmp_path / "store", [Product(id="p1", title="a red mug", category=["kitchen"])])
    return tmp_path / "store"


def _bad_meta(kind: str, meta) -> str:
    """Make ``meta`` (a path) the bad ``embedder.json`` of ``kind``; return a phrase of the error."""
    if kind == "fifo":
        os.mkfifo(meta)
        return "named pipe"
    if kind == "huge":
        with open(meta, "wb") as fh:
            fh.write(b'{"family": "moon"}')
            fh.truncate(MAX_EMBEDDER_JSON_BYTES + 1)  # sparse: claims 4 MiB + 1 byte
        return "too large"
    if kind == "deep":
        meta.write_bytes(b"[" * 200_000 + b"]" * 200_000)
        return "nested too deeply"
    if kind == "not-utf8":
        meta.write_bytes(b'{"family": "mo\xe9n"}')
        return "not UTF-8"
    if kind == "not-json":
        meta.write_bytes(b"{family: moon")
        return "not valid JSON"
    if kind == "list":
        meta.write_text('["moon"]')
        return "not a JSON object"
    if kind == "family-not-text":
        meta.write_text('{"family": ["moon"]}')
        return "'family' is a list"
    raise AssertionError(kind)


BAD_META = ["fifo", "huge", "deep", "not-utf8", "not-json", "list", "family-not-text"]


@pytest.mark.parametrize("kind", BAD_META)
def test_bad_embedder_json_is_one_line_error_naming_it(tmp_path, store, kind, within, one_line_cli_error):
    model = tmp_path / "model"
    model.mkdir()
    meta = model / EMBEDDER_FILE
    phrase = _bad_meta(kind, meta)
    before = os.lstat(meta)

    # the public paths: `moon eval --model DIR`, load_embedder(DIR), MoonEmbedder.from_pretrained(DIR)
    line = within(20, lambda: one_line_cli_error(["eval", "--model", str(model), "--data", str(store)]))
    assert str(meta) in line and phrase in line
    for load in (lambda: load_embedder(str(model)), lambda: MoonEmbedder.from_pretrained(str(model), device="cpu")):
        with pytest.raises(ConfigError) as info:
            within(20, load)
        msg = str(info.value)
        assert "\n" not in msg and str(meta) in msg and phrase in msg
    # the bad file is left as it was (nothing rewritten or removed)
    after = os.lstat(meta)
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (before.st_mode, before.st_size, before.st_mtime_ns)


def test_good_embedder_json_still_names_its_family(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / EMBEDDER_FILE).write_text(json.dumps({"family": "moon", "config": {}}))
    assert saved_family(str(model)) == "moon"
    assert saved_family(str(tmp_path)) is None  # no embedder.json: not a saved directory


# --------------------------------------------------------------------------- trust_remote_code


def _custom_code_dir(path, marker) -> None:
    """A checkpoint whose config.json names its own code (``auto_map``); importing that code
    would write ``marker``."""
    path.mkdir(parents=True)
    config = {
        "model_type": "moon_test_custom",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
        "architectures": ["EvilModel"],
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'moon_test_custom'\n"
    )


@pytest.fixture
def no_prompt(monkeypatch):
    """``input()`` recorded and refused: transformers' trust prompt must never be shown."""
    calls: list = []

    def fake_input(*args):
        calls.append(args)
        raise EOFError("no interactive input in this test")

    monkeypatch.setattr(builtins, "input", fake_input)
    return calls


def test_custom_code_checkpoint_is_refused_without_prompt_or_running_it(
    tmp_path, store, no_prompt, within, one_line_cli_error
):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt"
    _custom_code_dir(ckpt, marker)

    line = within(60, lambda: one_line_cli_error(["eval", "--model", str(ckpt), "--data", str(store)]))
    assert str(ckpt) in line and "own Python code" in line
    with pytest.raises(ConfigError) as info:
        MoonEmbedder.from_pretrained(str(ckpt), device="cpu")
    assert "\n" not in str(info.value) and "own Python code" in str(info.value)
    # as the graft's language model and as an hf: image encoder
    tiny_lm = {
        "model_type": "llama",
        "vocab_size": 200,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    random_lm = {"lm": "random", "lm_config": tiny_lm, "tokenizer": "qwen2-offline"}
    for where, graft in (
        ("graft.lm=", {"lm": str(ckpt)}),
        ("image encoder hf:", {**random_lm, "image_encoder": f"hf:{ckpt}"}),
    ):
        with pytest.raises(ConfigError) as info:
            MoonEmbedder.from_pretrained("moon-tiny", device="cpu", graft=graft)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(where) and "own Python code" in msg
    assert no_prompt == []
    assert not marker.exists()


def test_saved_moon_dir_with_custom_code_backbone_config_is_refused(tmp_path, no_prompt):
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    _custom_code_dir(model / "backbone", marker)
    (model / EMBEDDER_FILE).write_text(json.dumps({"family": "moon", "config": {"backbone": "moon-tiny"}}))
    with pytest.raises(ConfigError) as info:
        MoonEmbedder.from_pretrained(str(model), device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "backbone" in msg and "own Python code" in msg
    assert no_prompt == []
    assert not marker.exists()
