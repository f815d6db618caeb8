"""Run benchmark tasks: encode (through the cache), search, score.

:func:`evaluate` scores one embedder on the tasks of a store and returns an :class:`EvalResult`
(metrics + per-query rankings); :func:`evaluate_retrieval` is the quick Recall@10 that the trainer
calls for validation.

Leakage rule: classification and attribute tasks encode products from a copy with
``category=[]`` and ``attributes={}`` (title and images kept) — see :func:`strip_labels`.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moon import progress
from moon.bench.cache import EmbeddingCache, records_hash
from moon.bench.metrics import classification_metrics, recall_curve, retrieval_metrics
from moon.bench.search import exact_search
from moon.bench.tasks import TaskSpec, attribute_label_text, available_tasks, label_text, select_tasks
from moon.data.records import Product, Query
from moon.data.store import ProductStore
from moon.models import Embedder

#: How many candidates each query's ranking keeps (rankings.jsonl, curves).
TOP_K = 100
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)
QUERY_TASKS = ("text2product", "image2product", "multimodal2product")


def strip_labels(product: Product) -> Product:
    """A copy of ``product`` without category and attributes (title, images, crops kept)."""
    return dataclasses.replace(product, category=[], attributes={})


@dataclass
class TaskResult:
    """The outcome of one task.

    ``query_ids[i]`` was ranked as ``rankings[i]`` (candidate ids, best first, at most ``TOP_K``);
    retrieval tasks fill ``relevant`` (product ids), classification/attribute tasks ``truths``
    (the correct label texts) and ``y_true`` / ``y_pred`` (what the metrics saw).
    """

    spec: TaskSpec
    metrics: dict[str, float | None]
    n_queries: int
    n_candidates: int
    query_ids: list[str] = field(default_factory=list)
    rankings: list[list[str]] = field(default_factory=list)
    relevant: list[set[str]] = field(default_factory=list)
    truths: list[set[str]] = field(default_factory=list)
    y_true: list[str] = field(default_factory=list)
    y_pred: list[str] = field(default_factory=list)
    curve: dict[int, float] = field(default_factory=dict)

    @property
    def main_score(self) -> float | None:
        return self.metrics.get(self.spec.main_score)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.spec.kind,
            "metrics": self.metrics,
            "main_score": self.main_score,
            "main_metric": self.spec.main_score,
            "n_queries": self.n_queries,
            "n_candidates": self.n_candidates,
        }
        if self.curve:
            out["recall_curve"] = {str(k): v for k, v in self.curve.items()}
        return out

    def ranking_rows(self) -> Iterable[dict[str, Any]]:
        """One JSON-ready row per query for ``rankings.jsonl``."""
        key = "ranked_product_ids" if self.spec.kind == "retrieval" else "ranked_labels"
        for i, (qid, ranked) in enumerate(zip(self.query_ids, self.rankings, strict=True)):
            row: dict[str, Any] = {"task": self.spec.name, "query_id": qid, key: ranked}
            if self.truths:
                row["labels"] = sorted(self.truths[i])
            if self.relevant:  # what the metrics counted as a hit: per-query scores can be recomputed
                row["relevant_product_ids"] = sorted(self.relevant[i])
            yield row


@dataclass
class EvalResult:
    """All task results of one model on one store split."""

    model: str
    split: str
    data: str
    tasks: list[TaskResult]
    fingerprint: str = ""

    def task(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.spec.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "data": self.data,
            "split": self.split,
            "tasks": {t.spec.name: t.to_json() for t in self.tasks},
        }


class _CachedEncoder:
    """Encodes records through an :class:`EmbeddingCache` (keys: fingerprint + data hash + variant)."""

    def __init__(self, embedder: Embedder, cache: EmbeddingCache, data_salt: str, batch_size: int, show_progress: bool):
        self.embedder = embedder
        self.cache = cache
        self.salt = data_salt
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.embedder.fingerprint() if self.cache.directory is not None else ""
        return self._fingerprint

    def _run(self, records: Sequence[Any], variant: str, encode) -> np.ndarray:
        if not records:
            return np.zeros((0, int(self.embedder.dim)), dtype=np.float32)
        if self.cache.directory is None:
            return np.ascontiguousarray(encode(records), dtype=np.float32)
        data_hash = records_hash(records, salt=self.salt)
        return self.cache.get_or_compute(
            self.fingerprint,
            data_hash,
            variant,
            len(records),
            lambda: encode(records),
            meta={"model": self.embedder.name, "records": len(records)},
        )

    def products(self, products: Sequence[Product], variant: str) -> np.ndarray:
        return self._run(
            products,
            f"products:{variant}",
            lambda r: self.embedder.encode_products(r, batch_size=self.batch_size, show_progress=self.show_progress),
        )

    def queries(self, queries: Sequence[Query], variant: str) -> np.ndarray:
        return self._run(
            queries,
            f"queries:{variant}",
            lambda r: self.embedder.encode_queries(r, batch_size=self.batch_size, show_progress=self.show_progress),
        )


def _sample(items: list[Any], limit: int | None, seed: int) -> list[Any]:
    if limit is None or len(items) <= limit:
        return items
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]


class _Context:
    """Records and embeddings shared by the tasks of one evaluation (computed on first use)."""

    def __init__(self, store: ProductStore, split: str, encoder: _CachedEncoder, max_queries: int | None, seed: int):
        self.store = store
        self.split = split
        self.encoder = encoder
        self.max_queries = max_queries
        self.seed = seed
        self.products = store.products()
        self.product_ids = [p.id for p in self.products]
        self._full: np.ndarray | None = None
        self._no_leak: np.ndarray | None = None
        self._queries: list[Query] | None = None
        self._positives: dict[str, set[str]] | None = None

    def full(self) -> np.ndarray:
        if self._full is None:
            self._full = self.encoder.products(self.products, "full")
        return self._full

    def no_leak(self) -> np.ndarray:
        if self._no_leak is None:
            self._no_leak = self.encoder.products([strip_labels(p) for p in self.products], "no-leak")
        return self._no_leak

    def queries(self) -> list[Query]:
        if self._queries is None:
            self._queries = self.store.queries(self.split)
        return self._queries

    def positives(self) -> dict[str, set[str]]:
        if self._positives is None:
            self._positives = self.store.positives(self.split)
        return self._positives


def _ranked(ids: Sequence[str], idx: np.ndarray) -> list[list[str]]:
    if idx.size == 0:
        return [[] for _ in range(len(idx))]
    return np.asarray(ids, dtype=object)[idx].tolist()


def _retrieval(spec: TaskSpec, ctx: _Context, top_k: int) -> TaskResult:
    if spec.query_modality == "product":
        members: dict[str, list[int]] = {}
        for i, p in enumerate(ctx.products):
            if p.group:
                members.setdefault(p.group, []).append(i)
        rows = [i for i, p in enumerate(ctx.products) if p.group and len(members[p.group]) >= 2]
        rows = _sample(rows, ctx.max_queries, ctx.seed)
        query_ids = [ctx.product_ids[i] for i in rows]
        relevant = [{ctx.product_ids[j] for j in members[ctx.products[i].group] if j != i} for i in rows]
        if rows:
            idx, _ = exact_search(ctx.full()[rows], ctx.full(), top_k, exclude=rows)
        else:
            idx = np.zeros((0, 0), np.int64)
        n_candidates = max(len(ctx.products) - 1, 0)
    else:
        positives = ctx.positives()
        queries = [q for q in ctx.queries() if q.modality == spec.query_modality and positives.get(q.id)]
        queries = _sample(queries, ctx.max_queries, ctx.seed)
        query_ids = [q.id for q in queries]
        relevant = [positives[q.id] for q in queries]
        if queries:
            qv = ctx.encoder.queries(queries, f"{ctx.split}:{spec.query_modality}")
            idx, _ = exact_search(qv, ctx.full(), top_k)
        else:
            idx = np.zeros((0, 0), np.int64)
        n_candidates = len(ctx.products)
    rankings = _ranked(ctx.product_ids, idx)
    return TaskResult(
        spec=spec,
        metrics=retrieval_metrics(rankings, relevant),
        n_queries=len(query_ids),
        n_candidates=n_candidates,
        query_ids=query_ids,
        rankings=rankings,
        relevant=relevant,
        curve=recall_curve(rankings, relevant, CURVE_KS),
    )


def _labelled(spec: TaskSpec, ctx: _Context) -> tuple[list[int], list[set[str]], list[str]]:
    """Rows of the products that carry the task's label, their correct label texts, all label texts."""
    rows: list[int] = []
    truths: list[set[str]] = []
    for i, p in enumerate(ctx.products):
        if spec.kind == "classification":
            assert spec.level is not None
            if len(p.category) >= spec.level:
                rows.append(i)
                truths.append({label_text(p.category[: spec.level])})
        else:
            assert spec.attribute is not None
            values = [v for v in p.attributes.get(spec.attribute, []) if v]
            if values:
                rows.append(i)
                truths.append({attribute_label_text(spec.attribute, v) for v in values})
    labels = sorted({t for ts in truths for t in ts})
    return rows, truths, labels


def _classification(spec: TaskSpec, ctx: _Context, top_k: int) -> TaskResult:
    rows, truths, labels = _labelled(spec, ctx)
    keep = _sample(list(range(len(rows))), ctx.max_queries, ctx.seed)
    rows, truths = [rows[i] for i in keep], [truths[i] for i in keep]
    if rows:
        label_queries = [Query(id=f"label:{text}", text=text, split=ctx.split) for text in labels]
        lv = ctx.encoder.queries(label_queries, f"labels:{spec.name}")
        idx, _ = exact_search(ctx.no_leak()[rows], lv, top_k)
    else:
        idx = np.zeros((0, 0), np.int64)
    rankings = _ranked(labels, idx)
    y_pred = [r[0] if r else "" for r in rankings]
    # several correct values (multi-valued attributes): a prediction in the set counts as correct
    y_true = [pred if pred in truth else sorted(truth)[0] for pred, truth in zip(y_pred, truths, strict=True)]
    return TaskResult(
        spec=spec,
        metrics=classification_metrics(y_true, y_pred),
        n_queries=len(rows),
        n_candidates=len(labels),
        query_ids=[ctx.product_ids[i] for i in rows],
        rankings=rankings,
        truths=truths,
        y_true=y_true,
        y_pred=y_pred,
    )


def evaluate(
    embedder: Embedder,
    store: ProductStore | str,
    *,
    tasks: Iterable[str] | None = None,
    split: str = "test",
    batch_size: int = 16,
    cache: EmbeddingCache | None = None,
    max_queries: int | None = None,
    top_k: int = TOP_K,
    seed: int = 0,
    show_progress: bool = False,
) -> EvalResult:
    """Score ``embedder`` on the selected tasks of ``store``.

    Args:
        tasks: names / families / patterns (see :func:`moon.bench.tasks.select_tasks`); all by default.
        split: which queries the query→product tasks use (product→product, classification and
            attribute tasks use the whole catalogue).
        cache: where embeddings are cached (``None``: no caching).
        max_queries: a seeded sample of at most this many queries per task.
        top_k: candidates kept per query in the rankings (metrics need ≥ 10).

    Returns:
        An :class:`EvalResult`; metrics are fractions in [0, 1] (``None`` for tasks without queries).
    """
    store = store if isinstance(store, ProductStore) else ProductStore(store)
    encoder = _CachedEncoder(
        embedder, cache or EmbeddingCache(None), json.dumps(store.manifest, sort_keys=True), batch_size, show_progress
    )
    ctx = _Context(store, split, encoder, max_queries, seed)
    specs = select_tasks(available_tasks(ctx.products), tasks)
    results = []
    # one summary for the whole evaluation: a warning per record (truncation …) is counted, not repeated
    with progress.bar(len(specs), "eval tasks", enabled=show_progress, unit="task") as bar:
        for spec in specs:
            bar.set_postfix_str(spec.name)
            if spec.kind == "retrieval":
                results.append(_retrieval(spec, ctx, top_k))
            else:
                results.append(_classification(spec, ctx, top_k))
            bar.update(1)
        bar.set_postfix_str("")
    return EvalResult(
        model=embedder.name, split=split, data=str(store.root), tasks=results, fingerprint=encoder.fingerprint
    )


def evaluate_retrieval(
    embedder: Embedder,
    store: ProductStore | str,
    *,
    split: str = "val",
    tasks: Sequence[str] = QUERY_TASKS,
    batch_size: int = 16,
    max_queries: int | None = None,
) -> dict[str, float]:
    """Quick validation numbers for the trainer: Recall@10 per task and pooled over all queries.

    Returns ``{"recall@10": pooled, "<task>/recall@10": ..., "n_queries": N}`` (tasks without
    queries in ``split`` are left out; ``recall@10`` is 0 when there are no queries at all).
    """
    result = evaluate(
        embedder, store, tasks=tasks, split=split, batch_size=batch_size, max_queries=max_queries, top_k=10
    )
    out: dict[str, float] = {}
    total, n = 0.0, 0
    for t in result.tasks:
        if t.n_queries:
            score = float(t.metrics["recall@10"] or 0.0)
            out[f"{t.spec.name}/recall@10"] = score
            total += score * t.n_queries
            n += t.n_queries
    out["recall@10"] = total / n if n else 0.0
    out["n_queries"] = n
    return out
