"""The MBE-style benchmark: task registry, metrics, exact search, embedding cache, runner, reports.

    from moon.bench import evaluate, write_results
    result = evaluate(load_embedder("random"), "world/", split="test")
    write_results(result, "runs/eval-random")

Baselines live in :mod:`moon.models.baselines` (loaded with :func:`moon.load_embedder`).
"""

from moon.bench.cache import DEFAULT_CACHE_DIR, EmbeddingCache, records_hash
from moon.bench.metrics import classification_metrics, retrieval_metrics
from moon.bench.report import load_results, write_comparison, write_results
from moon.bench.runner import EvalResult, TaskResult, evaluate, evaluate_retrieval, strip_labels
from moon.bench.search import exact_search
from moon.bench.tasks import TaskSpec, available_tasks, select_tasks

__all__ = [
    "DEFAULT_CACHE_DIR",
    "EmbeddingCache",
    "EvalResult",
    "TaskResult",
    "TaskSpec",
    "available_tasks",
    "classification_metrics",
    "evaluate",
    "evaluate_retrieval",
    "exact_search",
    "load_results",
    "records_hash",
    "retrieval_metrics",
    "select_tasks",
    "strip_labels",
    "write_comparison",
    "write_results",
]
