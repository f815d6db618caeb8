"""Index writes lose nothing (issue: concurrent `moon index remove` lost 5 of 12 removals; a
half-saved index answered with the wrong vectors; an index written into a store's folder replaced
the store's manifest; a search during a save failed with "rebuild it").

Every test feeds the bad input itself: concurrent `moon index add/remove` processes, a build or a
remove killed with SIGKILL halfway, a crash just before the manifest is replaced, a vectors / ids
file from another save of the index, a store folder (or another tool's) as --out, a reader opening
the index while a writer saves it again and again. The design under test is
:mod:`moon.index.atomic`: data files named by generation, staged in ``INDEX/.moon-tmp-…/``, the
manifest (with each file's size and sha256) replaced last, and a lock for every writer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_index_hardening import _cli, _one_line_error  # the CLI helpers of the first round

from moon.data import ProductStore
from moon.errors import ConfigError, MoonError
from moon.index import (
    IndexFormatError,
    VectorIndex,
    build_index,
    build_index_from_vectors,
    make_query,
    read_manifest,
)

TOYS = Path(__file__).with_name("conftest.py")
STAGING_PREFIX = ".moon-tmp-"

# a process that imports MOON (and the toy model of conftest.py as family "toy"), says it is ready,
# waits for the go signal so that all of them start at once, then runs its `moon` commands in turn
WORKER = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("moon_test_toys", sys.argv[1])
    toys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toys)
    from moon.models import Family, register_family
    register_family(Family("toy", lambda arg: toys.ToyEmbedder(arg or "")))
    from moon.cli import main
    ready, go, commands = Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
    ready.touch()
    while not go.exists():
        time.sleep(0.001)
    for argv in commands:
        main(argv)
    """
)


def _run_together(tmp_path, command_lists, timeout=180):
    """Start one worker process per list of `moon` commands, release them all at once, wait."""
    go = tmp_path / "go"
    procs, ready = [], []
    for i, commands in enumerate(command_lists):
        ready.append(tmp_path / f"ready-{i}")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(TOYS), str(ready[-1]), str(go), json.dumps(commands)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err


def _vectors(n, dim=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _answers(index_dir, queries, k=5):
    """What the index answers: (id, rounded score) of the top k of each query."""
    index = VectorIndex.open(index_dir)
    return [[(h.id, round(h.score, 5)) for h in row] for row in index.search(queries, k)]


def _data_file(index_dir, what):
    """The vectors / ids file the manifest uses (fixed names in manifests before version 3)."""
    m = json.loads((index_dir / "manifest.json").read_text())
    legacy = {"vectors": "vectors.faiss", "ids": "ids.parquet"}
    return index_dir / (m["files"][what]["name"] if m.get("files") else legacy[what])


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------ (a) concurrent writers lose nothing
def test_twelve_concurrent_removals_are_all_kept(tmp_path):
    """4 processes, each running `moon index remove` for 3 different ids, started together."""
    vectors = _vectors(40)
    ids = [f"p{i:02d}" for i in range(40)]
    idx = tmp_path / "idx"
    build_index_from_vectors(idx, ids, vectors, model="m", fingerprint="f", kind="exact")
    gone = ids[:12]
    _run_together(tmp_path, [[["index", "remove", str(idx), pid] for pid in gone[i::4]] for i in range(4)])
    index = VectorIndex.open(idx)
    assert sorted(index.ids()) == ids[12:], f"lost removals: {sorted(set(gone) & set(index.ids()))}"
    assert read_manifest(idx).count == 28
    assert index.search(vectors[20:21], 1)[0][0].id == "p20"  # the remaining vectors are still the right ones


def test_concurrent_adds_and_removes_are_all_kept(tmp_path, toy_store, toy_embedder):
    """2 processes re-adding 4 products (`moon index add --id`) while 3 remove 6 others."""
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    readd = ["red-shoe", "green-bag", "blue-hat", "yellow-shoe"]
    index = VectorIndex.open(idx)
    index.remove(readd)
    index.save()
    others = [p for p in toy_store.product_ids() if p not in readd]
    removed, untouched = others[:6], others[6:]
    adds = [[["index", "add", str(idx), "--model", "toy", "--id", pid] for pid in readd[i::2]] for i in range(2)]
    removes = [[["index", "remove", str(idx), pid] for pid in removed[i::3]] for i in range(3)]
    _run_together(tmp_path, adds + removes)
    index = VectorIndex.open(idx)
    assert sorted(index.ids()) == sorted(untouched + readd)
    hit = index.search(toy_embedder.encode_products([toy_store.product("red-shoe")]), 1)[0][0]
    assert hit.id == "red-shoe" and hit.score == pytest.approx(1.0, abs=1e-5)  # its own vector, re-encoded


def test_a_writer_that_did_not_lock_cannot_drop_another_save(tmp_path, toy_store, toy_embedder):
    """Two copies opened without the lock: the second save is refused instead of undoing the first."""
    from moon.index import IndexConflictError

    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    first, second = VectorIndex.open(idx), VectorIndex.open(idx)
    first.remove(["red-shoe"])
    first.save()
    second.remove(["blue-bag"])
    with pytest.raises(IndexConflictError, match="saved by another writer after this copy was opened"):
        second.save()
    index = VectorIndex.open(idx)
    assert "red-shoe" not in index and "blue-bag" in index and len(index) == 11


# ------------------------------------------------ (b) a failed or killed write keeps the old index
@pytest.mark.parametrize("when", ["after-the-vectors-file", "before-the-manifest"])
def test_a_build_that_fails_midway_keeps_the_old_index(tmp_path, toy_store, toy_embedder, other_embedder, when):
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    queries = toy_embedder.encode_queries([make_query(t) for t in ("red shoe", "blue bag", "hat")])
    before, files, manifest = _answers(idx, queries), _listing(idx), (idx / "manifest.json").read_bytes()

    import faiss

    real_write, real_replace = faiss.write_index, os.replace

    def write_then_fail(*args):
        real_write(*args)
        raise OSError(28, "No space left on device (simulated)")

    def fail_at_the_manifest(src, dst, *args, **kwargs):
        if Path(dst) == idx / "manifest.json":
            raise OSError(28, "No space left on device (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        if when == "after-the-vectors-file":
            mp.setattr(faiss, "write_index", write_then_fail)
        else:
            mp.setattr(os, "replace", fail_at_the_manifest)
        with pytest.raises(MoonError, match=r"simulated.*the index on disk is unchanged"):
            build_index(other_embedder, toy_store, idx, model="toy", overwrite=True)
    assert (idx / "manifest.json").read_bytes() == manifest
    assert _answers(idx, queries) == before  # not the other model's vectors under the old manifest
    assert _listing(idx) == files  # nothing left behind


def test_a_remove_that_fails_midway_is_one_line_and_keeps_the_old_index(tmp_path, toy_store, toy_embedder, capsys):
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    ids, files = VectorIndex.open(idx).ids(), _listing(idx)
    real_replace = os.replace

    def fail_at_the_manifest(src, dst, *args, **kwargs):
        if Path(dst) == idx / "manifest.json":
            raise OSError(28, "No space left on device (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", fail_at_the_manifest)
        code, _, err = _cli(capsys, "index", "remove", str(idx), "red-shoe")
    _one_line_error(code, err, "the index on disk is unchanged")
    assert VectorIndex.open(idx).ids() == ids and _listing(idx) == files


def _clustered(n, dim, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(16, dim))
    v = (centres[rng.integers(0, 16, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# the new build stalls as soon as its vectors file is written, so that it can be killed there
KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import faiss
    import numpy as np
    real = faiss.write_index
    def stalled(*args):
        real(*args)
        Path(sys.argv[2]).touch()
        time.sleep(600)
    faiss.write_index = stalled
    root, what = sys.argv[1], sys.argv[3]
    if what == "build":
        from moon.index import build_index_from_vectors
        vectors = np.fromfile(sys.argv[4], dtype="<f4").reshape(-1, 32)
        build_index_from_vectors(root, [f"w{i}" for i in range(len(vectors))], vectors, model="m", fingerprint="f",
                                 kind="ivfpq", params={"nlist": 16, "pq_m": 16, "nprobe": 16}, recall_queries=0)
    else:
        from moon.cli import main
        main(["index", "remove", root, "v7", "v8"])
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("what", ["build", "remove"])
def test_kill_9_in_the_middle_of_a_write_keeps_the_old_index(tmp_path, what):
    """An IVF-PQ index (its re-rank vectors in their own file) rebuilt over, or edited, and killed."""
    idx = tmp_path / "idx"
    vectors = _clustered(2000, 32, 0)
    build_index_from_vectors(idx, [f"v{i}" for i in range(2000)], vectors, model="m", fingerprint="f", kind="ivfpq",
                             params={"nlist": 16, "pq_m": 16, "nprobe": 16}, recall_queries=0)  # fmt: skip
    queries = _clustered(20, 32, 5)
    before = _answers(idx, queries)
    new = tmp_path / "new.f32"
    _clustered(2000, 32, 1).tofile(new)
    stalled = tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(idx), str(stalled), what, str(new)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not stalled.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert _answers(idx, queries) == before  # the old index, whole: vectors, ids and re-rank rows
    # the next writer deletes what the killed one left behind
    with VectorIndex.edit(idx) as index:
        index.remove(["v1"])
        index.save()
    assert not [p for p in idx.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert sorted(p.name for p in idx.iterdir() if p.name != ".moon-index.lock") == sorted(
        ["manifest.json", *read_manifest(idx).data_files()]
    )


# ------------------------------------------------ (c) a data file that does not belong to the manifest
@pytest.mark.parametrize("what", ["vectors", "ids"])
def test_a_half_saved_index_is_refused_on_open(tmp_path, toy_store, toy_embedder, toy_family, capsys, what):
    """The vectors (or ids) file of a later save of the same index, under the old manifest: the same
    shape (12 vectors of 16 dims), other contents."""
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    later = tmp_path / "later"
    shutil.copytree(idx, later)
    index = VectorIndex.open(later)  # red-shoe removed and added again: a new label, a new row
    index.remove(["red-shoe"])
    index.add(["red-shoe"], toy_embedder.encode_products([toy_store.product("red-shoe")]))
    index.save()
    assert len(VectorIndex.open(later)) == len(VectorIndex.open(idx)) == 12
    shutil.copyfile(_data_file(later, what), _data_file(idx, what))
    with pytest.raises(IndexFormatError, match="does not belong to this index"):
        VectorIndex.open(idx)
    code, _, err = _cli(capsys, "search", str(idx), "--model", "toy", "--text", "red shoe")
    _one_line_error(code, err, f"{_data_file(idx, what)}: does not belong to this index")
    from moon.serve import create_app

    with pytest.raises(IndexFormatError, match="does not belong to this index"):
        create_app(idx, toy_embedder)


def test_a_missing_data_file_is_one_line(tmp_path, toy_store, toy_embedder, toy_family, capsys):
    idx = tmp_path / "idx"
    build_index(toy_embedder, toy_store, idx, model="toy")
    _data_file(idx, "ids").unlink()
    code, _, err = _cli(capsys, "search", str(idx), "--model", "toy", "--text", "hat")
    _one_line_error(code, err, "missing, but manifest.json names it")


# ------------------------------------------------ (d) never into a store's (or anyone's) manifest.json
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_an_index_is_never_written_into_a_store_folder(
    tmp_path, toy_store, toy_embedder, toy_family, capsys, overwrite
):
    root = toy_store.root
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    argv = ["index", "build", "--model", "toy", "--data", str(root), "--out", str(root)]
    code, _, err = _cli(capsys, *argv, *(["--overwrite"] if overwrite else []))
    _one_line_error(code, err, "holds a product store (its manifest.json says moon-store); refusing to write an index")
    with pytest.raises(ConfigError, match="even with --overwrite"):
        build_index(toy_embedder, toy_store, root, model="toy", overwrite=overwrite)
    with pytest.raises(ConfigError, match="product store"):
        build_index_from_vectors(root, ["a"], _vectors(1), model="m", fingerprint="f")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files  # not one byte, not one new file
    assert len(ProductStore(root).product_ids()) == 12


@pytest.mark.parametrize(
    "content",
    [b'{"format": "another-tool", "version": 1}\n', b"not json", b"[1, 2]", b'{"format": "moon-index", "x": "\xff"}'],
    ids=["other-format", "not-json", "a-list", "unreadable-index-manifest"],
)
def test_an_index_is_never_written_over_a_foreign_manifest(tmp_path, toy_family, capsys, content):
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    with pytest.raises(ConfigError, match="refusing to write an index there"):
        build_index_from_vectors(out, ["a"], _vectors(1), model="m", fingerprint="f")
    code, _, err = _cli(capsys, "index", "build", "--model", "toy", "--data", str(tmp_path), "--out", str(out),
                        "--overwrite")  # fmt: skip
    _one_line_error(code, err, "refusing to write an index there, even with --overwrite")
    assert _listing(out) == ["manifest.json"] and (out / "manifest.json").read_bytes() == content


# ------------------------------------------------ (e) readers never see half a save
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from moon.index import VectorIndex
    root, ready, go, saves = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    vector = np.fromfile(sys.argv[5], dtype="<f4").reshape(1, -1)
    ready.touch()
    while not go.exists():
        time.sleep(0.001)
    for _ in range(saves):
        index = VectorIndex.open(root)
        if "p00" in index:
            index.remove(["p00"])
        else:
            index.add(["p00"], vector)
        index.save()
    """
)


def test_a_reader_never_fails_while_the_index_is_saved_again_and_again(tmp_path):
    vectors = _vectors(50)
    ids = [f"p{i:02d}" for i in range(50)]
    idx = tmp_path / "idx"
    build_index_from_vectors(idx, ids, vectors, model="m", fingerprint="f", kind="exact")
    vectors[:1].tofile(tmp_path / "p00.f32")
    ready, go = tmp_path / "ready", tmp_path / "go"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(idx), str(ready), str(go), "150", str(tmp_path / "p00.f32")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
        time.sleep(0.01)
    go.touch()
    reads, failures = 0, []
    while writer.poll() is None:
        try:
            index = VectorIndex.open(idx)
        except MoonError as exc:
            failures.append(str(exc))
            continue
        reads += 1
        got = set(index.ids())
        # one state or the other, each whole: the manifest's count, the ids and the vectors agree
        assert got in (set(ids), set(ids[1:])) and index.manifest.count == len(index) == len(got)
        hit = index.search(vectors[7:8], 1)[0][0]
        assert hit.id == "p07" and hit.score == pytest.approx(1.0, abs=1e-5)
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    assert failures == [], f"{len(failures)} of {reads + len(failures)} opens failed, e.g. {failures[0]}"
    assert reads >= 10  # the reader did overlap the writer
    assert read_manifest(idx).generation == 151


def test_a_reader_whose_files_are_replaced_while_it_opens_them_reads_again(tmp_path, monkeypatch):
    """The race of (e) made certain: a save (which deletes the old generation's files) lands
    between the reader's reading of manifest.json and its opening of the files."""
    idx = tmp_path / "idx"
    build_index_from_vectors(idx, ["a", "b", "c"], _vectors(3), model="m", fingerprint="f", kind="exact")
    real = VectorIndex._load.__func__
    raced = []

    def racing(cls, root, manifest):
        if not raced:
            raced.append(manifest.generation)
            writer = VectorIndex.open(root)
            writer.remove(["a"])
            writer.save()
        return real(cls, root, manifest)

    monkeypatch.setattr(VectorIndex, "_load", classmethod(racing))
    index = VectorIndex.open(idx)
    assert raced == [1] and index.manifest.generation == 2 and index.ids() == ["b", "c"]


# ------------------------------------------------ older manifests, re-rank segments
def _to_legacy(idx):
    """Rewrite a version-3 index into the layout of version 2 (fixed names, no files/generation)."""
    m = json.loads((idx / "manifest.json").read_text())
    os.replace(idx / m["files"]["vectors"]["name"], idx / "vectors.faiss")
    os.replace(idx / m["files"]["ids"]["name"], idx / "ids.parquet")
    if m["files"]["rerank"]:
        with open(idx / "rerank.f32", "wb") as out:
            for seg in m["files"]["rerank"]:
                out.write((idx / seg["name"]).read_bytes())
                (idx / seg["name"]).unlink()
    (idx / ".moon-index.lock").unlink()
    for key in ("files", "generation"):
        del m[key]
    m["version"] = 2
    (idx / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("kind", ["exact", "ivfpq"])
def test_a_version_2_index_still_opens_and_its_next_save_writes_version_3(tmp_path, kind):
    idx = tmp_path / "idx"
    vectors = _clustered(2000, 32, 0)
    ids = [f"v{i}" for i in range(2000)]
    params = {"nlist": 16, "pq_m": 16, "nprobe": 16} if kind == "ivfpq" else None
    build_index_from_vectors(idx, ids, vectors, model="m", fingerprint="f", kind=kind, params=params, recall_queries=0)
    queries = _clustered(20, 32, 5)
    before = _answers(idx, queries)
    _to_legacy(idx)
    assert read_manifest(idx).version == 2 and _answers(idx, queries) == before
    with VectorIndex.edit(idx) as index:
        index.remove(["v7"])
        index.add(["v7"], vectors[7:8])
        index.save()
    m = read_manifest(idx)
    assert m.version == 3 and m.generation == 1 and "v7" in VectorIndex.open(idx)
    assert sorted(p.name for p in idx.iterdir()) == sorted([".moon-index.lock", "manifest.json", *m.data_files()])
    if kind == "ivfpq":  # the old rerank.f32 and the new row were merged into one segment
        assert [(s["start"], s["rows"]) for s in m.files["rerank"]] == [(0, 2001)]
    assert _answers(idx, queries) == before or kind == "ivfpq"
    hit = VectorIndex.open(idx).search(vectors[7:8], 1)[0][0]
    assert hit.id == "v7" and hit.score == pytest.approx(1.0, abs=1e-4)


def test_a_version_2_index_with_a_broken_vectors_file_is_one_line(tmp_path, capsys):
    idx = tmp_path / "idx"
    build_index_from_vectors(idx, ["a", "b"], _vectors(2), model="m", fingerprint="f", kind="exact")
    _to_legacy(idx)
    (idx / "vectors.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match="unreadable FAISS index"):
        VectorIndex.open(idx)


def test_rerank_segments_are_appended_then_merged(tmp_path):
    """Each save of an IVF-PQ index with new products adds a segment; past 16 they are merged. The
    re-rank scores stay the exact inner products throughout."""
    from moon.index.vector_index import MAX_RERANK_SEGMENTS

    idx = tmp_path / "idx"
    vectors = _clustered(2000 + MAX_RERANK_SEGMENTS + 1, 32, 0)
    build_index_from_vectors(idx, [f"v{i}" for i in range(2000)], vectors[:2000], model="m", fingerprint="f",
                             kind="ivfpq", params={"nlist": 16, "pq_m": 16, "nprobe": 16}, recall_queries=0)  # fmt: skip
    counts = []
    for i in range(2000, len(vectors)):
        with VectorIndex.edit(idx) as index:
            index.add([f"v{i}"], vectors[i : i + 1])
            index.save()
        counts.append(len(read_manifest(idx).files["rerank"]))
    # one segment from the build, one more per save, merged into one when a 17th would appear
    assert counts == [*range(2, MAX_RERANK_SEGMENTS + 1), 1, 2]
    index = VectorIndex.open(idx)
    for i in (5, 2000, len(vectors) - 1):
        hit = index.search(vectors[i : i + 1], 1)[0][0]
        assert hit.id == f"v{i}" and hit.score == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.name for p in idx.iterdir()) == sorted(
        [".moon-index.lock", "manifest.json", *read_manifest(idx).data_files()]
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda f: f["vectors"].update(name="../../etc/passwd"), "files.vectors.name must be a file name"),
        (lambda f: f["ids"].update(sha256="x"), "files.ids.sha256 must be 64 hex digits"),
        (lambda f: f.pop("ids"), "files must have the keys"),
        (lambda f: f["vectors"].update(bytes=-1), "files.vectors.bytes must be an integer >= 0"),
    ],
    ids=["path", "sha", "missing", "bytes"],
)
def test_crafted_file_records_are_refused_by_name(tmp_path, change, needle):
    idx = tmp_path / "idx"
    build_index_from_vectors(idx, ["a", "b"], _vectors(2), model="m", fingerprint="f", kind="exact")
    m = json.loads((idx / "manifest.json").read_text())
    change(m["files"])
    (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match=needle):
        read_manifest(idx)
