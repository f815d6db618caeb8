"""The task registry: small declarations of MBE-style tasks, expanded against a store.

Retrieval tasks are fixed (``text2product``, ``image2product``, ``multimodal2product``,
``product2product``); classification and attribute tasks depend on the store: one
``classification-l<L>`` per category level and one ``attribute-<type>`` per attribute type.

Selection strings (``--tasks``) may name a task, a family (``retrieval``, ``classification``,
``attribute``, ``all``) or an ``fnmatch`` pattern (``attribute-*``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moon.bench.metrics import CLASSIFICATION_METRICS, RETRIEVAL_METRICS
from moon.data.records import Product
from moon.errors import ConfigError

KINDS = ("retrieval", "classification", "attribute")


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task.

    Attributes:
        name: unique task name (``text2product``, ``classification-l2``, ``attribute-color``).
        kind: ``retrieval``, ``classification`` or ``attribute``.
        query_modality: ``text``, ``image``, ``multimodal`` (search queries), ``product`` (a product is
            the query) or ``label`` (products are classified against label texts).
        candidates: ``products`` (the whole catalogue), ``products-except-self`` or ``labels``.
        metrics: the metric names reported.
        main_score: the metric used to rank models.
        level: the category level (1-based) of a classification task.
        attribute: the attribute type of an attribute task.
    """

    name: str
    kind: str
    query_modality: str
    candidates: str
    metrics: tuple[str, ...]
    main_score: str
    level: int | None = None
    attribute: str | None = None
    description: str = ""


RETRIEVAL_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        "text2product",
        "retrieval",
        "text",
        "products",
        RETRIEVAL_METRICS,
        "recall@10",
        description="text query → purchased product",
    ),
    TaskSpec(
        "image2product",
        "retrieval",
        "image",
        "products",
        RETRIEVAL_METRICS,
        "recall@10",
        description="photo query → purchased product",
    ),
    TaskSpec(
        "multimodal2product",
        "retrieval",
        "multimodal",
        "products",
        RETRIEVAL_METRICS,
        "recall@10",
        description="photo + text query → purchased product",
    ),
    TaskSpec(
        "product2product",
        "retrieval",
        "product",
        "products-except-self",
        RETRIEVAL_METRICS,
        "recall@10",
        description="product → its duplicate listings (same group)",
    ),
)


def classification_task(level: int) -> TaskSpec:
    """Zero-shot classification at category ``level`` (1-based) against that level's path labels."""
    return TaskSpec(
        f"classification-l{level}",
        "classification",
        "label",
        "labels",
        CLASSIFICATION_METRICS,
        "accuracy",
        level=level,
        description=f"category level {level}, zero-shot",
    )


def attribute_task(attribute: str) -> TaskSpec:
    """Zero-shot prediction of one attribute type against that type's values."""
    return TaskSpec(
        f"attribute-{attribute}",
        "attribute",
        "label",
        "labels",
        CLASSIFICATION_METRICS,
        "accuracy",
        attribute=attribute,
        description=f"attribute {attribute!r}, zero-shot",
    )


def available_tasks(products: Sequence[Product]) -> list[TaskSpec]:
    """Every task the catalogue supports: retrieval, one per category level, one per attribute type."""
    depth = max((len(p.category) for p in products), default=0)
    types = sorted({k for p in products for k, v in p.attributes.items() if v})
    return [
        *RETRIEVAL_TASKS,
        *(classification_task(lv) for lv in range(1, depth + 1)),
        *(attribute_task(t) for t in types),
    ]


def select_tasks(available: Sequence[TaskSpec], selection: Iterable[str] | None) -> list[TaskSpec]:
    """The tasks named by ``selection`` (names, families, ``all`` or patterns), in registry order.

    Raises:
        ConfigError: a selection string matches nothing (the message lists what is available).
    """
    wanted = [s.strip() for item in (selection or ["all"]) for s in str(item).split(",") if s.strip()]
    chosen: set[str] = set()
    for sel in wanted:
        if sel == "all":
            hits = [t.name for t in available]
        elif sel in KINDS:
            hits = [t.name for t in available if t.kind == sel]
        else:
            hits = [t.name for t in available if fnmatch.fnmatchcase(t.name, sel)]
        if not hits:
            names = ", ".join(t.name for t in available)
            raise ConfigError(
                f"task {sel!r} matches nothing in this store; available: all, {', '.join(KINDS)}, {names}"
            )
        chosen.update(hits)
    return [t for t in available if t.name in chosen]


def label_text(path: Sequence[str]) -> str:
    """A category path prefix as a label text: ``"Fashion > Shoes > Sneakers"``."""
    return " > ".join(path)


def attribute_label_text(attribute: str, value: str) -> str:
    """An attribute value as a label text: ``"color: white"``."""
    return f"{attribute}: {value}"
