"""Issues #16 and #19, index side: a manifest never makes MOON run code, a saved model directory is
found from any working directory (or after moving index and model together), a missing one is a
clear error, and a crafted manifest is refused by field."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from moon.cli import main
from moon.embedders import load_embedder
from moon.errors import ConfigError, MoonError
from moon.index import IndexFormatError, build_index, read_manifest

TINY = {"dim": 16, "hidden": 32, "layers": 1, "heads": 2, "image_size": 32, "patch": 16, "max_text_len": 16}


@pytest.fixture
def saved_model(tmp_path):
    """A small dual-encoder saved by ``save_pretrained`` (safetensors + embedder.json)."""
    model = load_embedder("dual-encoder", **TINY)
    model.save_pretrained(str(tmp_path / "models" / "de"))
    return tmp_path / "models" / "de"


def _cli(capsys, *argv):
    """Run ``moon ARGV``; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, err, needle):
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err


def _build_relative(tmp_path, toy_store, saved_model, capsys):
    """``moon index build`` run inside tmp_path with relative --model / --data / --out."""
    assert toy_store.root == tmp_path / "store"
    os.chdir(tmp_path)
    code, out, err = _cli(capsys, "index", "build", "--model", "models/de", "--data", "store", "--out", "idx")
    assert code == 0, err
    return tmp_path / "idx"


def test_search_works_from_another_directory(tmp_path, toy_store, saved_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    idx = _build_relative(tmp_path, toy_store, saved_model, capsys)
    m = read_manifest(idx)
    assert m.model == str(saved_model.resolve()) and m.model_relative == "../models/de"
    assert m.store == str((tmp_path / "store").resolve()) and m.store_relative == "../store"
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    os.chdir(elsewhere)
    code, out, err = _cli(capsys, "search", str(idx), "--text", "red shoe", "-k", "3", "--json")
    assert code == 0, err
    hits = json.loads(out)
    assert len(hits) == 3 and all(h["title"] for h in hits)  # the store was found too: titles are shown


def test_index_model_and_store_moved_together_still_work(tmp_path, toy_store, saved_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _build_relative(tmp_path, toy_store, saved_model, capsys)
    os.chdir("/")
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(tmp_path), str(moved))  # the absolute paths in the manifest are gone now
    try:
        code, out, err = _cli(capsys, "search", str(moved / "idx"), "--text", "red shoe", "-k", "2", "--json")
        assert code == 0, err
        assert [h["title"] != "" for h in json.loads(out)] == [True, True]
    finally:
        shutil.move(str(moved), str(tmp_path))


def test_a_deleted_model_directory_is_a_clear_error(tmp_path, toy_store, saved_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    idx = _build_relative(tmp_path, toy_store, saved_model, capsys)
    shutil.rmtree(saved_model)
    code, _, err = _cli(capsys, "search", str(idx), "--text", "red shoe")
    _one_line_error(code, err, "the model directory the index was built with is gone")
    assert "Repo id" not in err
    with pytest.raises(IndexFormatError, match="pass --model DIR"):
        from moon.serve import create_app

        create_app(idx)


def test_an_old_manifest_with_a_relative_path_names_what_is_missing(tmp_path, toy_embedder, toy_store, capsys):
    build_index(toy_embedder, toy_store, tmp_path / "idx", model="runs/small/final")
    data = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    data.update(version=1, model_relative=None)
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(data))
    code, _, err = _cli(capsys, "search", str(tmp_path / "idx"), "--text", "hat")
    _one_line_error(code, err, "the model directory the index was built with is gone")


def _plant_code(directory, marker):
    """A transformers-style checkpoint whose custom code writes ``marker`` when imported."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (directory / "config.json").write_text(
        json.dumps({"model_type": "planted", "auto_map": {"AutoConfig": "planted.Cfg", "AutoModel": "planted.Model"}})
    )


@pytest.mark.parametrize("how", ["gme-spec", "py-spec", "gme-family-dir", "open-clip", "hub-id"])
def test_a_crafted_manifest_never_runs_code(tmp_path, toy_embedder, toy_store, capsys, how, monkeypatch):
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    marker = tmp_path / "pwned"
    _plant_code(idx, marker)  # the index's own Python file
    monkeypatch.syspath_prepend(str(idx))
    model_dir = tmp_path / "model"
    spec = {
        "gme-spec": f"gme:{idx}",
        "py-spec": "py:planted:make",
        "gme-family-dir": str(model_dir),
        "open-clip": f"open-clip:ViT-B-32@{idx / 'planted.py'}",
        "hub-id": "evil/model",
    }[how]
    if how == "gme-family-dir":
        _plant_code(model_dir, marker)
        (model_dir / "embedder.json").write_text(json.dumps({"family": "gme"}))
    data = json.loads((idx / "manifest.json").read_text())
    data.update(model=spec, model_relative=None)
    (idx / "manifest.json").write_text(json.dumps(data))
    code, _, err = _cli(capsys, "search", str(idx), "--text", "hat")
    _one_line_error(code, err, "which MOON does not load on a data file's word")
    code, _, err = _cli(capsys, "index", "add", str(idx))
    _one_line_error(code, err, "which MOON does not load on a data file's word")
    from moon.serve import create_app

    with pytest.raises(ConfigError, match="pass --model"):
        create_app(idx)
    assert not marker.exists()
    assert "planted" not in sys.modules


def test_gme_runs_checkpoint_code_only_on_the_users_flag(tmp_path, capsys):
    marker = tmp_path / "ran"
    _plant_code(tmp_path / "gme", marker)
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        load_embedder(f"gme:{tmp_path / 'gme'}")
    code, _, err = _cli(
        capsys,
        "index",
        "build",
        "--model",
        f"gme:{tmp_path / 'gme'}",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "i"),
    )
    _one_line_error(code, err, "--trust-remote-code")
    assert not marker.exists()
    # with the explicit flag the checkpoint's code is run (here it is not a real model, so loading fails after)
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers makes of the fake class
        load_embedder(f"gme:{tmp_path / 'gme'}", trust_remote_code=True)
    assert marker.exists()


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("count", "lots", "count must be an integer >= 0"),
        ("dim", -3, "dim must be an integer in 1..65536"),
        ("recall_at_10", 7, "recall_at_10 must be a number in [0, 1]"),
        ("params", {"nprobe": "all"}, "params.nprobe must be an integer"),
        ("model", ["moon-tiny"], "model must be a string"),
        ("recall_source", "vibes", "recall_source must be one of"),
        ("version", "2", "version must be an integer"),
    ],
)
def test_crafted_manifest_fields_are_refused_by_name(tmp_path, toy_embedder, toy_store, capsys, field, value, needle):
    build_index(toy_embedder, toy_store, tmp_path / "idx", model="toy")
    data = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    data[field] = value
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match=needle.replace("[", r"\[")):
        read_manifest(tmp_path / "idx")
    code, _, err = _cli(capsys, "index", "info", str(tmp_path / "idx"))
    _one_line_error(code, err, needle)


@pytest.mark.parametrize(
    "content",
    [b'{"format": "moon-index", "model": "\xff"}', b"[" * 100_000 + b"]" * 100_000, b""],
    ids=["non-utf8", "100k-deep", "empty"],
)
def test_unreadable_manifests_are_clear_errors(tmp_path, content, capsys):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "manifest.json").write_bytes(content)
    with pytest.raises(MoonError, match="unreadable manifest"):
        read_manifest(tmp_path / "idx")
    code, _, err = _cli(capsys, "search", str(tmp_path / "idx"), "--text", "x")
    _one_line_error(code, err, "unreadable manifest")
