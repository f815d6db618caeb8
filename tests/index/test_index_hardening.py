"""Issues #16 and #19, index side: a manifest never makes MOON run code, a saved model directory is
found from any working directory (or after moving index and model together), a missing one is a
clear error, and a crafted manifest is refused by field."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

import faiss
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon.cli import main
from moon.errors import ConfigError, MoonError
from moon.index import IndexFormatError, VectorIndex, build_index, read_manifest
from moon.models import load_embedder

TINY = {"dim": 16, "hidden": 32, "layers": 1, "heads": 2, "image_size": 32, "patch": 16, "max_text_len": 16}


@pytest.fixture
def saved_model(tmp_path):
    """A small dual-encoder saved by ``save_pretrained`` (safetensors + embedder.json)."""
    model = load_embedder("dual-encoder", overrides=TINY)
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


# ------------------------------------------------ a manifest naming a checkpoint with custom code (auto_map)
def _custom_code_model(tmp_path, where, marker):
    """A model directory with custom code declared in ``where`` (the rest plain weights' files)."""
    model_dir = tmp_path / "model"
    if where == "saved-moon-backbone":  # a saved MOON directory whose backbone/config.json maps code
        _plant_code(model_dir / "backbone", marker)
        (model_dir / "embedder.json").write_text(json.dumps({"family": "moon", "config": {}}))
        return model_dir
    _plant_code(model_dir, marker)  # config.json with auto_map, planted.py next to it
    if where != "config.json":  # only ``where`` maps code: config.json is a plain Qwen2-VL one
        (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
        (model_dir / where).write_text(json.dumps({"auto_map": {"AutoTokenizer": ["planted.Tok", None]}}))
    return model_dir


@pytest.mark.parametrize(
    "where", ["config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
              "saved-moon-backbone"],
)  # fmt: skip
def test_a_manifest_naming_a_model_with_custom_code_is_refused_before_loading(
    tmp_path, toy_embedder, toy_store, capsys, monkeypatch, where
):
    """transformers, not told trust_remote_code, would stop at its "run the custom code? [y/N]" prompt
    (a hung ``moon serve``) or run the code: refused before anything is loaded, without a prompt."""
    prompts = []

    def no_prompt(*args, **kwargs):
        prompts.append(args)
        raise AssertionError(f"input() reached: {args}")

    monkeypatch.setattr("builtins.input", no_prompt)
    marker = tmp_path / "ran"
    model_dir = _custom_code_model(tmp_path, where, marker)
    monkeypatch.syspath_prepend(str(model_dir))
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    data = json.loads((idx / "manifest.json").read_text())
    data.update(model=str(model_dir), model_relative=None)
    (idx / "manifest.json").write_text(json.dumps(data))
    bad = "backbone/config.json" if where == "saved-moon-backbone" else where
    needle = f"names the model directory {model_dir}, whose {bad} has an auto_map (custom code"
    for argv in (["search", str(idx), "--text", "hat"], ["index", "add", str(idx)]):
        code, _, err = _cli(capsys, *argv)
        _one_line_error(code, err, needle)
        assert "--trust-remote-code" in err
    from moon.serve import create_app

    with pytest.raises(ConfigError, match="has an auto_map"):
        create_app(idx)
    assert prompts == [] and not marker.exists() and "planted" not in sys.modules


def test_a_users_own_model_is_not_checked_for_custom_code(tmp_path, toy_family, toy_embedder, toy_store, capsys):
    """The refusal is about data files: ``--model`` given by the user is the user's call (here a
    custom-code directory next to the index is ignored when the user names the model)."""
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    _plant_code(tmp_path / "model", tmp_path / "ran")
    data = json.loads((idx / "manifest.json").read_text())
    data.update(model=str(tmp_path / "model"), model_relative=None)
    (idx / "manifest.json").write_text(json.dumps(data))
    code, out, err = _cli(capsys, "search", str(idx), "--model", "toy", "--text", "red shoe", "-k", "1", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["id"] == "red-shoe"


# ------------------------------------------------ damaged id table / vectors file of another kind
def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _replace_data_file(idx, what, data):
    """Write ``data`` as the index's ``what`` file and record its size and sha256 in the manifest, so
    that only the contents are wrong (a damaged index as a buggy or crafted writer leaves it)."""
    manifest = json.loads((idx / "manifest.json").read_text())
    rec = manifest["files"][what]
    (idx / rec["name"]).write_bytes(data)
    rec.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (idx / "manifest.json").write_text(json.dumps(manifest))
    return idx / rec["name"]


def _parquet(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _refused_by_every_reader(capsys, idx, message: str) -> list[str]:
    """Opening the index, ``moon search`` and ``moon index remove`` each refuse it with ``message``
    (one line for the commands); returns the commands' stderr."""
    with pytest.raises(IndexFormatError, match=re.escape(message)):
        VectorIndex.open(idx)
    errors = []
    for argv in (
        ["search", str(idx), "--model", "toy", "--text", "red shoe"],
        ["index", "remove", str(idx), "red-shoe"],
    ):
        code, _, err = _cli(capsys, *argv)
        _one_line_error(code, err, message)
        errors.append(err)
    return errors


@pytest.mark.parametrize(
    ("columns", "needle"),
    [
        ({"label": pa.array(range(12), pa.int64())}, "expected columns label (int64) and id (string), got label (int64)"),
        ({"label": pa.array(range(12), pa.int64()), "product": pa.array([f"p{i}" for i in range(12)])},
         "got label (int64), product (string)"),
        ({"label": pa.array(range(12), pa.int32()), "id": pa.array([f"p{i}" for i in range(12)])},
         "got label (int32), id (string)"),
        ({"label": pa.array(range(12), pa.int64()), "id": pa.array(["p0", "p1", "p2", "p1"] + [f"q{i}" for i in range(8)])},
         "id 'p1' appears twice (rows 1 and 3)"),
        ({"label": pa.array([0, 1, 2, 2] + list(range(4, 12)), pa.int64()), "id": pa.array([f"p{i}" for i in range(12)])},
         "label 2 appears twice (rows 2 and 3)"),
        ({"label": pa.array(range(12), pa.int64()), "id": pa.array(["p0", None, "p2", None] + [f"q{i}" for i in range(8)])},
         "2 null ids (row 1 …)"),
        ({"label": pa.array([0, None] + list(range(2, 12)), pa.int64()), "id": pa.array([f"p{i}" for i in range(12)])},
         "1 null label (row 1)"),
    ],
    ids=["no-id-column", "id-column-renamed", "label-int32", "duplicate-id", "duplicate-label", "null-ids",
         "null-label"],
)  # fmt: skip
def test_a_damaged_id_table_is_one_line_and_changes_nothing(
    tmp_path, toy_store, toy_embedder, toy_family, capsys, columns, needle
):
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    path = _replace_data_file(idx, "ids", _parquet(pa.table(columns)))
    before = _snapshot(idx)
    for err in _refused_by_every_reader(capsys, idx, f"{path}: "):
        assert needle in err and "rebuild" in err
    assert _snapshot(idx) == before


@pytest.mark.parametrize(
    ("built", "recorded", "needle"),
    [
        ("exact", "hnsw", "holds an index of kind 'exact', but manifest.json says kind 'hnsw'"),
        ("hnsw", "exact", "holds an index of kind 'hnsw', but manifest.json says kind 'exact'"),
        ("exact", "ivfpq", "holds an index of kind 'exact', but manifest.json says kind 'ivfpq'"),
        ("flat-l2", "exact", "holds a FAISS IndexIDMap2(IndexFlatL2) index, which MOON does not write, but"),
    ],
    ids=["flat-as-hnsw", "hnsw-as-exact", "flat-as-ivfpq", "l2-as-exact"],
)
def test_a_vectors_file_of_another_kind_is_one_line_and_changes_nothing(
    tmp_path, toy_store, toy_embedder, toy_family, capsys, built, recorded, needle
):
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy", kind="exact" if built == "flat-l2" else built)
    manifest = json.loads((idx / "manifest.json").read_text())
    if built == "flat-l2":  # the same vectors and labels under the L2 metric: a structure MOON never writes
        index = VectorIndex.open(idx).faiss
        other = faiss.IndexIDMap2(faiss.IndexFlatL2(index.d))
        other.add_with_ids(index.index.reconstruct_n(0, index.ntotal), faiss.vector_to_array(index.id_map))
        _replace_data_file(idx, "vectors", faiss.serialize_index(other).tobytes())
    else:
        manifest["kind"] = recorded
        (idx / "manifest.json").write_text(json.dumps(manifest))
    path = idx / manifest["files"]["vectors"]["name"]
    before = _snapshot(idx)
    _refused_by_every_reader(capsys, idx, f"{path}: {needle}")
    assert _snapshot(idx) == before
