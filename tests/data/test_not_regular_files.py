"""Hardening round two, "nothing hangs": a path where a file is expected may name a named pipe
(FIFO), a device (``/dev/zero``), a socket, a directory or a sparse file of a terabyte. Every image
read goes through :mod:`moon.data.safe_open` (via ``load_image`` / ``image_sha1``), which refuses
them with one line instead of blocking in ``open()`` or reading until the kernel kills MOON.

Each test makes the bad input itself. The time bounds are safety nets (a hang shows up as a failed
test, not a stuck run), not speed requirements; a thread left blocked on a FIFO is released by
opening the FIFO's other end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon.data import (
    ImageLoadError,
    Product,
    ProductStore,
    Purchase,
    Query,
    StoreError,
    image_sha1,
    load_image,
    safe_open,
)
from moon.data.images import DEFAULT_MAX_BYTES, MAX_BYTES_ENV, read_image_bytes
from moon.data.mbe import import_mbe, read_rows
from moon.data.safe_open import FileRefusedError, open_regular, read_regular
from moon.data.store import write_store
from moon.errors import DataError

BOUND_S = 10  # in-process: a call that blocks longer than this is a hang
CLI_BOUND_S = 180  # a `moon` subprocess (imports torch on a busy machine): longer than this is a hang
MOON = [sys.executable, "-c", "from moon.cli import main; main()"]
TINY = {"dim": 16, "hidden": 32, "layers": 1, "heads": 2, "image_size": 32, "patch": 16, "max_text_len": 16}
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


# ------------------------------------------------------------------ helpers
def _refused(within, seconds: float, fn, *fifos: Path) -> BaseException:
    """The exception ``fn()`` refuses with, within ``seconds`` (``within``: the shared fixture)."""
    with pytest.raises(BaseException) as info:  # noqa: PT011 - each test checks the error it got
        within(seconds, fn, *fifos)
    if isinstance(info.value, pytest.fail.Exception):  # a hang, not a refusal
        raise info.value
    return info.value


def _limit_memory() -> None:
    """In a `moon` subprocess: a reader that never stops (``/dev/zero``) fails with MemoryError at
    2 GiB of heap instead of taking the machine's memory (RLIMIT_DATA counts anonymous mmaps)."""
    resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))


def _moon(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    try:
        out = subprocess.run(
            [*MOON, *args],
            capture_output=True,
            text=True,
            timeout=CLI_BOUND_S,
            cwd=cwd,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`moon {' '.join(args)}` still running after {CLI_BOUND_S} s: it hangs")
    return out, time.monotonic() - start


def _one_line_error(out: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2 and one ``error: …`` line, the last on stderr (a progress line may come before it)."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and [x for x in lines if x.startswith("error:")] == lines[-1:], out.stderr
    assert needle in lines[-1], out.stderr


def _make_store(root: Path) -> ProductStore:
    """Three products with one solid-colour 24×24 PNG each; queries and purchases in every split."""
    (root / "images").mkdir(parents=True)
    products, queries, purchases = [], [], []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        path = root / "images" / f"{colour}.png"
        Image.new("RGB", (24, 24), rgb).save(path)
        products.append(Product(id=colour, title=f"{colour} shoe", images=[path], category=["Fashion", "shoes"]))
        for split in ("train", "val", "test"):
            queries.append(Query(id=f"{split}{i}", text=f"{colour} shoe", split=split))
            purchases.append(Purchase(f"{split}{i}", colour, 1_700_000_000 + i, ""))
    return write_store(root, products, queries, purchases)


def _fifo_in_place_of(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


@pytest.fixture
def store(tmp_path) -> ProductStore:
    return _make_store(tmp_path / "store")


# ------------------------------------------------------------------ load_image: FIFO
@needs_fifo
def test_fifo_at_a_product_image_path_is_refused_at_once(store, within):
    rel = store.product("green").images[0]
    fifo = _fifo_in_place_of(Path(rel))
    error = _refused(within, BOUND_S, lambda: load_image(fifo), fifo)
    assert isinstance(error, ImageLoadError)
    assert str(error) == f"{fifo}: is a named pipe (FIFO), not an image"
    error = _refused(within, BOUND_S, lambda: image_sha1(fifo), fifo)  # the training catalog's hash reads it too
    assert isinstance(error, ImageLoadError) and error.reason == "is a named pipe (FIFO), not an image"


@needs_fifo
def test_fifo_swapped_in_after_the_check_does_not_block_the_open(tmp_path, monkeypatch, within):
    """The race: the path was a regular file when it was checked and is a FIFO when it is opened.
    ``O_NONBLOCK`` keeps the open from blocking and the ``fstat`` of the descriptor refuses it."""
    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(safe_open, "check_regular", lambda *a, **k: None)  # the path check "passed"
    error = _refused(within, BOUND_S, lambda: open_regular(fifo, 1024, what="an image"), fifo)
    assert isinstance(error, FileRefusedError) and error.reason == "is a named pipe (FIFO), not an image"
    error = _refused(within, BOUND_S, lambda: load_image(fifo), fifo)
    assert isinstance(error, ImageLoadError) and error.reason == "is a named pipe (FIFO), not an image"


@needs_fifo
def test_import_reports_a_fifo_image_and_keeps_the_product(tmp_path, within):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    os.mkfifo(imgs / "a.png")
    src = tmp_path / "mbe.jsonl"
    src.write_text(json.dumps({"id": "a", "doc_title": "t", "doc_image": "a.png"}) + "\n")
    stored, report = within(BOUND_S, lambda: import_mbe([str(src)], tmp_path / "s", images_dir=imgs), imgs / "a.png")
    assert [p.id for p in stored.products()] == ["a"] and stored.product("a").images == []
    assert report.missing_images == ["mbe.jsonl:1: 'a.png': is a named pipe (FIFO), not an image"]


# ------------------------------------------------------------------ load_image: other non-files
def test_a_unix_socket_as_an_image_is_refused(tmp_path, monkeypatch, within):
    monkeypatch.chdir(tmp_path)  # AF_UNIX paths are limited to ~107 bytes: bind a short relative name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("img.png")
        error = _refused(within, BOUND_S, lambda: load_image("img.png"))
    assert isinstance(error, ImageLoadError) and str(error) == "img.png: is a socket, not an image"


def test_a_directory_as_an_image_is_refused(tmp_path, within):
    (tmp_path / "photo.jpg").mkdir()
    error = _refused(within, BOUND_S, lambda: load_image(tmp_path / "photo.jpg"))
    assert isinstance(error, ImageLoadError) and error.reason == "is a directory, not an image"


def test_a_character_device_as_an_image_is_refused(tmp_path, within):
    """``/dev/null`` (behind a symlink named like a photo) is a device, not an empty image; the
    same check refuses ``/dev/zero``, which the CLI test below feeds in a memory-capped process."""
    link = tmp_path / "photo.png"
    link.symlink_to("/dev/null")
    error = _refused(within, BOUND_S, lambda: load_image(link))
    assert isinstance(error, ImageLoadError) and error.reason == "is a character device, not an image"


# ------------------------------------------------------------------ size cap
def test_a_file_one_byte_over_the_cap_is_refused_by_its_size(tmp_path, within):
    big = tmp_path / "big.png"
    subprocess.run(["truncate", "-s", str(DEFAULT_MAX_BYTES + 1), str(big)], check=True)  # sparse: no data written
    error = _refused(within, BOUND_S, lambda: load_image(big))
    assert isinstance(error, ImageLoadError)
    assert error.reason == (
        f"too large ({DEFAULT_MAX_BYTES + 1:,} bytes > limit {DEFAULT_MAX_BYTES:,} bytes; set {MAX_BYTES_ENV} to raise it)"
    )


def test_a_terabyte_sparse_file_is_refused_before_it_is_read(tmp_path, within):
    """The exact size in the reason comes from ``fstat``: the refusal happened before any read
    (reading would have said "more than the limit"), and the peak memory did not grow."""
    huge = tmp_path / "huge.jpg"
    subprocess.run(["truncate", "-s", "1T", str(huge)], check=True)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = _refused(within, BOUND_S, lambda: load_image(huge))
    assert isinstance(error, ImageLoadError) and error.reason.startswith(f"too large ({1 << 40:,} bytes > limit")
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grew_kib < 256 * 1024, f"peak memory grew by {grew_kib / 1024:.0f} MiB"


def test_the_cap_is_an_argument_and_an_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    size = path.stat().st_size
    with pytest.raises(ImageLoadError, match=rf"too large \({size:,} bytes > limit {size - 1:,} bytes\)$"):
        load_image(path, max_bytes=size - 1)
    assert load_image(path, max_bytes=size).size == (64, 64)
    monkeypatch.setenv(MAX_BYTES_ENV, str(size - 1))
    with pytest.raises(ImageLoadError, match=f"set {MAX_BYTES_ENV} to raise it"):
        load_image(path)
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    from moon.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{MAX_BYTES_ENV} must be a whole number"):
        load_image(path)


def test_a_file_larger_than_its_size_says_is_read_no_further_than_the_cap():
    """Files in /proc say they hold 0 bytes: only the read bound (cap + 1 bytes) stops them."""
    assert os.stat("/proc/self/maps").st_size == 0
    with pytest.raises(FileRefusedError, match=r"too large \(more than the limit of 16 bytes\)"):
        read_regular("/proc/self/maps", 16)
    with pytest.raises(ImageLoadError, match=r"too large \(more than the limit of 16 bytes\)"):
        load_image("/proc/self/maps", max_bytes=16)
    with pytest.raises(ImageLoadError, match=r"<image stream>: too large \(more than the limit of 16 bytes\)"):
        load_image(io.BytesIO(b"\x89PNG" + b"\0" * 100), max_bytes=16)


# ------------------------------------------------------------------ good images are unchanged
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_normal_image_still_loads_byte_identically(tmp_path, fmt):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(rgb).save(path, fmt)
    raw = path.read_bytes()
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert np.array_equal(np.asarray(load_image(raw)), expected)
    assert read_image_bytes(path) == raw
    assert image_sha1(path) == hashlib.sha1(raw).hexdigest()
    assert read_regular(path, len(raw)) == raw


@needs_fifo
def test_store_tables_and_manifests_that_are_not_files_are_refused(store, tmp_path, within):
    """The store's own files and import sources are user files too: a FIFO manifest blocked
    ``read_text`` (``moon data stats`` hung); tables and sources are refused by kind, not as
    "empty" or "no such file"."""
    table = _fifo_in_place_of(store.root / "products.parquet")
    error = _refused(within, BOUND_S, lambda: list(ProductStore(store.root).products()), table)
    assert isinstance(error, StoreError) and str(error) == f"{table}: is a named pipe (FIFO), not a parquet table"
    manifest = _fifo_in_place_of(store.root / "manifest.json")
    error = _refused(within, BOUND_S, lambda: ProductStore(store.root), manifest)
    assert isinstance(error, StoreError) and str(error) == f"{manifest}: is a named pipe (FIFO), not a manifest"
    source = tmp_path / "mbe.jsonl"
    os.mkfifo(source)
    error = _refused(within, BOUND_S, lambda: list(read_rows(source)), source)
    assert isinstance(error, DataError) and str(error) == f"{source}: is a named pipe (FIFO), not a data file"


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from moon.models import load_embedder

    path = tmp_path_factory.mktemp("models") / "de"
    load_embedder("dual-encoder", overrides=TINY).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model) -> Path:
    from moon.index import build_index
    from moon.models import load_embedder

    root = tmp_path_factory.mktemp("indexed")
    good = _make_store(root / "store")
    build_index(load_embedder(str(tiny_model)), good, root / "idx", model=str(tiny_model))
    return root / "idx"


@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "directory"])
def test_search_with_a_non_file_image_is_one_line_and_quick(tmp_path, index_dir, what):
    """`moon search INDEX --image /dev/zero` used to read until the kernel killed it (here: until
    the 2 GiB heap limit of the test's subprocess); a FIFO blocked it; a directory was a usage
    block of four lines."""
    if what == "/dev/zero":
        image, reason = "/dev/zero", "/dev/zero: is a character device, not an image"
    elif what == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("named pipes are POSIX")
        image = str(tmp_path / "query.jpg")
        os.mkfifo(image)
        reason = f"{image}: is a named pipe (FIFO), not an image"
    else:
        image = str(tmp_path / "query.jpg")
        os.mkdir(image)
        reason = f"{image}: is a directory, not an image"
    out, seconds = _moon("search", str(index_dir), "--text", "red shoe", "--image", image)
    _one_line_error(out, reason)
    assert seconds < 60, f"took {seconds:.0f} s"  # refused before the model or the index is loaded


@needs_fifo
@pytest.mark.parametrize("command", ["index build", "eval", "train"])
def test_index_build_eval_and_train_on_a_store_with_a_fifo_image_do_not_hang(tmp_path, tiny_model, command):
    """All three used to block forever in ``open()`` (train already in its image-hash catalog)."""
    store = _make_store(tmp_path / "store")
    fifo = _fifo_in_place_of(Path(store.product("green").images[0]))
    data = ["--model", str(tiny_model), "--data", str(store.root)]
    if command == "index build":
        out, _ = _moon("index", "build", *data, "--out", str(tmp_path / "i"))
    elif command == "eval":
        out, _ = _moon("eval", *data, "--tasks", "retrieval", "--out", str(tmp_path / "e"))
    else:
        out, _ = _moon(
            "train", "--preset", "moon-tiny", *data, "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "r"),
            "run.val_every=0", "run.tensorboard=false", "negatives.hard=0",
        )  # fmt: skip
        if out.returncode == 0:  # the catalog skips an unreadable image; the one step did not draw it
            return
    _one_line_error(out, f"{fifo}: is a named pipe (FIFO), not an image")


def test_a_fifo_manifest_in_an_index_out_folder_is_refused_without_hanging(tmp_path):
    # `moon index build --out DIR` reads DIR/manifest.json to refuse foreign folders: a FIFO must not block
    import os

    from moon.errors import ConfigError
    from moon.index.atomic import check_index_target, manifest_format

    out = tmp_path / "idx"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    result = {}

    def probe():
        result["format"] = manifest_format(out / "manifest.json")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(10)  # a safety net against a hang, not a speed requirement
    if t.is_alive():  # release the blocked reader before failing
        with open(out / "manifest.json", "wb"):
            pass
        pytest.fail("reading a FIFO manifest.json blocked")
    assert result["format"] == "?"
    with pytest.raises(ConfigError):
        check_index_target(out)
