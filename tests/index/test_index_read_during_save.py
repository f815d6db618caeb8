"""Hardening round two, "nothing hangs, one-line errors": a search that opens an index while a
writer (``moon index add/remove/build``) saves it again and again.

It used to fail now and then with ``inconsistent index …; rebuild it`` (advice that would throw a
good index away). The mechanism (:mod:`moon.index.atomic`): every save writes a new generation of
data files under new names and replaces ``manifest.json`` last with one rename; a reader opens the
files its manifest names right after reading it, checks each against the size and sha256 the
manifest records, and — when one is gone or does not match because the manifest changed meanwhile —
reads the index again, up to ``OPEN_ATTEMPTS`` times. Only if every attempt races a save does it
fail, and then the one-line error says the index was being written and to try again.

Here a writer process saves (adds, then removes, five products) without pause while a reader opens
and searches the index 200 times, for each kind of index: every open must succeed and see one whole
state, the old or the new, never a mix.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from moon.errors import MoonError
from moon.index import VectorIndex, build_index_from_vectors, read_manifest
from moon.index.vector_index import OPEN_ATTEMPTS

OPENS = 200
EXTRA = [f"new{i}" for i in range(5)]


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


KINDS = {
    # kind: (products, dim, params)
    "exact": (50, 16, None),
    "hnsw": (50, 16, None),
    "ivfpq": (1000, 32, {"nlist": 8, "pq_m": 8, "nprobe": 8, "rerank": 4}),
}


# the writer: a process that saves the index again and again (add five products, then remove them)
# until told to stop; it prints how many saves it made
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from moon.index import VectorIndex
    root, extra, ready, stop = Path(sys.argv[1]), np.load(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    ids = [f"new{i}" for i in range(len(extra))]
    ready.touch()
    saves = 0
    while not stop.exists() and saves < 5000:
        with VectorIndex.edit(root) as index:
            if ids[0] in index:
                index.remove(ids)
            else:
                index.add(ids, extra)
            index.save()
        saves += 1
    print(saves)
    """
)


@pytest.mark.parametrize("kind", list(KINDS))
def test_200_opens_during_saves_all_succeed_and_see_one_whole_state(kind, tmp_path, within):
    n, dim, params = KINDS[kind]
    vectors = _unit(n + len(EXTRA), dim, 0)
    base = [f"v{i}" for i in range(n)]
    idx = tmp_path / "idx"
    build_index_from_vectors(
        idx, base, vectors[:n], model="m", fingerprint="f", kind=kind, params=params, recall_queries=0
    )
    np.save(tmp_path / "extra.npy", vectors[n:])
    old, new = set(base), set(base) | set(EXTRA)
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(idx), str(tmp_path / "extra.npy"), str(ready), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def read() -> tuple[list[str], set[int], int]:
        while not ready.exists():
            assert writer.poll() is None, writer.communicate()
            time.sleep(0.01)
        failures, generations = [], set()
        opens, deadline = 0, time.monotonic() + 20
        # OPENS opens, and on a slow machine more, until they have seen several saves (or 20 s passed)
        while opens < OPENS or (len(generations) < 4 and time.monotonic() < deadline):
            opens += 1
            try:
                index = VectorIndex.open(idx)
            except MoonError as exc:
                failures.append(str(exc))
                continue
            got = set(index.ids())
            # one state or the other, each whole: the manifest's count, the ids and the vectors agree
            assert got in (old, new), f"a mix: {len(got)} ids"
            assert index.manifest.count == len(index) == len(got)
            generations.add(index.manifest.generation)
            hits = index.search(np.concatenate([vectors[7:8], vectors[n : n + 1]]), 1)
            assert hits[0][0].id == "v7" and hits[0][0].score == pytest.approx(1.0, abs=1e-4)
            if got == new:  # the new products' vectors came with their ids
                assert hits[1][0].id == EXTRA[0] and hits[1][0].score == pytest.approx(1.0, abs=1e-4)
            else:
                assert hits[1][0].id != EXTRA[0]
        return failures, generations, opens

    try:
        failures, generations, opens = within(60, read)
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    saves = int(out)
    assert failures == [], f"{len(failures)} of {opens} opens failed, e.g. {failures[0]}"
    # the reader did overlap the writer: it saw several generations
    assert len(generations) >= 3, (saves, sorted(generations))
    final = VectorIndex.open(idx)
    assert set(final.ids()) in (old, new) and read_manifest(idx).generation == 1 + saves


def test_a_reader_that_races_a_save_on_every_attempt_says_try_again_not_rebuild(
    tmp_path, monkeypatch, one_line_cli_error
):
    """The bounded retry: a save lands between the reading of manifest.json and the opening of its
    files on every one of the ``OPEN_ATTEMPTS`` attempts (a writer saving without pause)."""
    idx = tmp_path / "idx"
    vectors = _unit(4, 16, 0)
    build_index_from_vectors(idx, ["a", "b", "c", "d"], vectors, model="m", fingerprint="f", kind="exact")
    real = VectorIndex._load.__func__
    attempts, writing = [], []

    def racing(cls, root, manifest):
        if writing:  # the writer's own open
            return real(cls, root, manifest)
        attempts.append(manifest.generation)
        writing.append(True)
        try:
            with VectorIndex.edit(root) as writer:  # its save deletes the files this manifest names
                if "a" in writer:
                    writer.remove(["a"])
                else:
                    writer.add(["a"], vectors[:1])
                writer.save()
        finally:
            writing.clear()
        return real(cls, root, manifest)

    monkeypatch.setattr(VectorIndex, "_load", classmethod(racing))
    line = one_line_cli_error(["search", str(idx), "--text", "red shoe"])
    assert len(attempts) == OPEN_ATTEMPTS and attempts == list(range(1, OPEN_ATTEMPTS + 1))
    assert f"{idx}: the index was saved again while it was being read, {OPEN_ATTEMPTS} times in a row" in line
    assert line.endswith("try again") and "rebuild" not in line and "restore" not in line, line

    monkeypatch.undo()  # the writer has stopped: the index opens, whole
    index = VectorIndex.open(idx)
    assert index.manifest.generation == 1 + OPEN_ATTEMPTS and len(index) == len(index.ids()) in (3, 4)
