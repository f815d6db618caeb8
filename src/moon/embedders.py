"""The embedder protocol every model implements, and the registry that loads one by name.

Anything with ``name``, ``dim``, ``fingerprint()``, ``encode_products`` and ``encode_queries`` can
be scored by the benchmark, trained against, indexed and served: MOON itself
(:class:`moon.model.MoonEmbedder`) and the baselines alike.

``load_embedder(spec)`` resolves a spec string:

* ``"<family>"`` or ``"<family>:<path-or-arg>"`` for a registered family (``random``,
  ``dual-encoder:RUN_DIR``, ``pretrained-towers:RUN_DIR`` …);
* anything else is handed to the default family (MOON): a preset name (``moon-tiny``), a local
  directory written by ``save_pretrained``, or a hub id.

Families register themselves with :func:`register_embedder`; registration modules are imported
lazily so that importing :mod:`moon` stays cheap.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moon.data.records import Product, Query
from moon.errors import ConfigError


@runtime_checkable
class Embedder(Protocol):
    """What the harness, trainer, index and server need from a model.

    ``encode_products`` / ``encode_queries`` return float32 arrays of shape ``(n, dim)``, rows
    L2-normalised, in input order.
    """

    name: str
    dim: int

    def fingerprint(self) -> str:
        """A stable hash of weights + config: embeddings are cached under it."""
        ...

    def encode_products(
        self, products: Sequence[Product], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray: ...

    def encode_queries(
        self, queries: Sequence[Query], *, batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray: ...


class TrainableEmbedder(Embedder, Protocol):
    """An embedder that ``moon train`` can train (a ``torch.nn.Module``).

    The trainer never looks inside: it asks the model to turn records into CPU-side inputs,
    to collate them into a batch, and to embed a batch with gradients.

    * ``build_product_inputs(products)`` / ``build_query_inputs(queries)`` → one opaque input per
      record (tokenised text, pixel values …), on CPU, picklable for DataLoader workers;
    * ``collate(items)`` → one batch (items are all products or all queries);
    * ``forward(batch)`` → ``(B, dim)`` L2-normalised tensor on the module's device, with gradients;
    * ``aux_loss()`` → scalar tensor added to the loss (e.g. MoE load balancing of the last
      forward), zero when the model has none;
    * ``save_pretrained(dir)`` writes ``embedder.json`` (with ``"family"``) and safetensors weights,
      so that ``load_embedder(dir)`` loads it back.
    """

    def build_product_inputs(self, products: Sequence[Product]) -> list[Any]: ...

    def build_query_inputs(self, queries: Sequence[Query]) -> list[Any]: ...

    def collate(self, items: Sequence[Any]) -> Any: ...

    def forward(self, batch: Any) -> Any: ...

    def aux_loss(self) -> Any: ...

    def save_pretrained(self, directory: str) -> None: ...


EmbedderFactory = Callable[[str | None], Embedder]

_FACTORIES: dict[str, EmbedderFactory] = {}
# family name → module that registers it when imported (lazy: heavy imports happen on first use)
_LAZY: dict[str, str] = {
    "moon": "moon.model.embedder",
    "random": "moon.bench.baselines",
    "dual-encoder": "moon.bench.baselines",
    "pretrained-towers": "moon.bench.baselines",
    "two-tower": "moon.bench.baselines",
    "open-clip": "moon.bench.baselines",
    "gme": "moon.bench.baselines",
}
DEFAULT_FAMILY = "moon"


def register_embedder(family: str, factory: EmbedderFactory) -> None:
    """Make ``load_embedder("family[:arg]")`` call ``factory(arg)``."""
    _FACTORIES[family] = factory


def families() -> list[str]:
    return sorted(set(_FACTORIES) | set(_LAZY))


def _factory(family: str) -> EmbedderFactory:
    if family not in _FACTORIES and family in _LAZY:
        importlib.import_module(_LAZY[family])
    if family not in _FACTORIES:
        raise ConfigError(f"unknown embedder family {family!r}; known: {', '.join(families())}")
    return _FACTORIES[family]


EMBEDDER_FILE = "embedder.json"
#: the most bytes of ``embedder.json`` that are read (it holds a config, a few KB)
MAX_EMBEDDER_JSON_BYTES = 4 << 20


def has_embedder_file(path: str | os.PathLike) -> bool:
    """Whether ``path/embedder.json`` exists in any form (a FIFO or a dangling link too, so that
    :func:`read_embedder_meta` refuses it with one line instead of the path being taken for a hub id)."""
    return os.path.lexists(os.path.join(os.fspath(path), EMBEDDER_FILE))


def read_embedder_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in ``path/embedder.json``, read with the bounded reader: a file that is not a
    regular file (a FIFO never blocks), larger than :data:`MAX_EMBEDDER_JSON_BYTES`, nested too
    deeply, not UTF-8, not JSON or not a JSON object is a one-line :class:`ConfigError` naming it."""
    from moon.data.safe_open import read_json
    from moon.errors import DataError

    meta_path = os.path.join(os.fspath(path), EMBEDDER_FILE)
    try:
        meta = read_json(meta_path, MAX_EMBEDDER_JSON_BYTES)
    except DataError as exc:
        raise ConfigError(f"unreadable saved model: {exc}") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"unreadable saved model: {meta_path}: not a JSON object ({type(meta).__name__})")
    family = meta.get("family")
    if family is not None and not isinstance(family, str):
        raise ConfigError(f"unreadable saved model: {meta_path}: 'family' is a {type(family).__name__}, expected text")
    return meta


def saved_family(path: str) -> str | None:
    """The family recorded in ``path/embedder.json`` by ``save_pretrained``, if there is one."""
    if not has_embedder_file(path):
        return None
    return read_embedder_meta(path).get("family")


def load_embedder(spec: str, **kwargs: Any) -> Embedder:
    """Load an embedder from a spec string (see the module docstring).

    A directory written by any family's ``save_pretrained`` is recognised by its ``embedder.json``.
    """
    family = saved_family(spec)
    if family is not None:
        factory = _factory(family)
        return factory(spec, **kwargs) if kwargs else factory(spec)
    family, _, arg = spec.partition(":")
    if family in _FACTORIES or family in _LAZY:
        factory = _factory(family)
        return factory(arg or None, **kwargs) if kwargs else factory(arg or None)
    factory = _factory(DEFAULT_FAMILY)
    return factory(spec, **kwargs) if kwargs else factory(spec)
