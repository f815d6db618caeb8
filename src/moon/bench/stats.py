"""Statistics for comparing models: mean ± std over seeds, paired tests with 95 % intervals.

Pure numpy (plus :mod:`math`); the Student-t distribution is implemented here so that nothing beyond
numpy is needed.

* :func:`seed_summary` — mean, sample standard deviation and the t-interval of the mean over seeds.
* :func:`paired_bootstrap` — per-query scores of two models on the same queries: the difference of a
  statistic (the mean by default), its 95 % percentile bootstrap interval and a two-sided p-value.
* :func:`paired_seeds` — per-seed values of two models (paired by seed): the mean difference, its
  t-interval and the paired t-test p-value.
* :func:`verdict` — ``"supported"`` / ``"contradicted"`` / ``"inconclusive"`` for the claim "a > b".
* :func:`per_query_scores` / :func:`align` — per-query retrieval scores of a finished ``moon eval``
  run (from its ``rankings.jsonl``), paired by query id, ready for :func:`paired_bootstrap`.

Distribution helpers: :func:`betainc` (regularized incomplete beta, Numerical Recipes' ``betai`` /
``betacf``), :func:`t_cdf`, :func:`t_sf2` (two-sided tail) and :func:`t_quantile` (the CDF inverted by
bisection; exact to ~1e-10 for any df, not a table).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "PairedTest",
    "SeedSummary",
    "align",
    "betainc",
    "paired_bootstrap",
    "paired_seeds",
    "per_query_scores",
    "seed_summary",
    "t_cdf",
    "t_quantile",
    "t_sf2",
    "verdict",
]

#: Index elements drawn per bootstrap chunk (rows × queries): 2**22 int64 = 32 MiB, plus one gather of
#: the same size per input — memory stays bounded whatever ``n_resamples × n_queries`` is.
_CHUNK_ELEMENTS = 1 << 22

Verdict = Literal["supported", "contradicted", "inconclusive"]


# ---------------------------------------------------------------------------------------------------
# Student-t distribution
# ---------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes §6.4, modified Lentz)."""
    tiny, eps, max_iter = 1e-300, 1e-15, 10_000
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (tiny if abs(d) < tiny else d)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        # even step
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (tiny if abs(d) < tiny else d)
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        h *= d * c
        # odd step
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (tiny if abs(d) < tiny else d)
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"betacf did not converge (a={a}, b={b}, x={x})")  # pragma: no cover


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0, 0 ≤ x ≤ 1.

    Numerical Recipes' ``betai``: the prefactor x^a (1-x)^b / (a B(a, b)) times the continued
    fraction :func:`_betacf`, evaluated directly for x < (a+1)/(a+b+2) and through the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) otherwise (where the fraction converges fast).
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _check_df(df: float) -> None:
    if not df > 0 or math.isinf(df):
        raise ValueError(f"degrees of freedom must be positive and finite, got {df}")


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| ≥ |t|) of Student's t with ``df`` degrees of freedom.

    P(|T| ≥ |t|) = I_x(df/2, 1/2) with x = df / (df + t²) (1 for t = 0, 0 for |t| = ∞).
    This is the p-value of a two-sided t-test.
    """
    _check_df(df)
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom: 1 - t_sf2(t)/2 for t ≥ 0, t_sf2(t)/2 below."""
    tail = t_sf2(t, df) / 2.0
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (the inverse of :func:`t_cdf`), for 0 < q < 1.

    Found by bisection on the two-sided tail :func:`t_sf2` (monotone in |t|) to a relative
    precision of 1e-12 — e.g. ``t_quantile(0.975, 4)`` = 2.7764…, the two-sided 95 % critical value.
    """
    _check_df(df)
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    target = 2.0 * (1.0 - q)  # two-sided tail at the answer
    lo, hi = 0.0, 2.0
    while t_sf2(hi, df) > target:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedSummary:
    """Mean ± std of one number over seeds (see :func:`seed_summary` for the definitions)."""

    mean: float
    std: float
    n: int
    ci95: tuple[float, float]

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``"mean ± std (n=N)"`` with both multiplied by ``scale`` (100 for metrics in %)."""
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f} (n={self.n})"

    def __str__(self) -> str:
        return self.format(digits=4)


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of model a against model b (``difference`` = a - b).

    Attributes:
        difference: statistic(a) - statistic(b) (bootstrap) or mean(a - b) (paired t).
        ci95: the two-sided 95 % interval of the difference (``(nan, nan)`` when undefined).
        p_value: two-sided p-value for "no difference" (``nan`` when undefined).
        n: number of pairs (queries or seeds).
        method: ``"bootstrap"`` (:func:`paired_bootstrap`) or ``"paired-t"`` (:func:`paired_seeds`).
        std_error: standard deviation of the bootstrap differences, or sd(a - b) / sqrt(n).
        df: degrees of freedom of the t-interval (paired t: n - 1; ``None`` for the bootstrap).
        n_resamples: bootstrap resamples (0 for paired t).
        resampled: the bootstrap differences, one per resample (read-only; ``None`` for paired t),
            kept so that :meth:`interval` can give other confidence levels.
    """

    difference: float
    ci95: tuple[float, float]
    p_value: float
    n: int
    method: Literal["bootstrap", "paired-t"]
    std_error: float
    df: int | None = None
    n_resamples: int = 0
    resampled: np.ndarray | None = field(default=None, repr=False, compare=False)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The two-sided interval at ``confidence`` (same definition as ``ci95``, which it equals at 0.95)."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if self.method == "bootstrap":
            if self.resampled is None:
                raise ValueError("this bootstrap result carries no resampled differences")
            return _percentile_interval(self.resampled, confidence)
        if self.df is None or not math.isfinite(self.std_error):
            return (math.nan, math.nan)
        half = t_quantile(0.5 + confidence / 2.0, self.df) * self.std_error
        return (self.difference - half, self.difference + half)

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``"+d [low, high] p=P (method, n=N)"`` with the difference and interval multiplied by ``scale``."""
        lo, hi = self.ci95
        return (
            f"{self.difference * scale:+.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}] "
            f"p={self.p_value:.3g} ({self.method}, n={self.n})"
        )

    def __str__(self) -> str:
        return self.format(digits=4)


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def _as_values(x: Any, name: str) -> np.ndarray:
    """A 1-D float64 copy of ``x``; ValueError for other shapes, empty input, NaN or ±inf."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a sequence of numbers ({exc})") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty input (no values)")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "NaN" if np.isnan(arr[i]) else "an infinite value"
        raise ValueError(f"{name}: contains {what} at position {i} ({int(bad.sum())} non-finite in all)")
    return arr


def _as_pair(a: Any, b: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"mismatched lengths: a has {x.size} values but b has {y.size} "
            f"(paired {what} must be the same {what} in the same order)"
        )
    return x, y


# ---------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------


def seed_summary(values: Any) -> SeedSummary:
    """Mean ± std of one number (a metric) over seeds, with the t-interval of the mean.

    Definitions, for n values x_1..x_n:

    * ``mean`` = Σ x_i / n;
    * ``std`` = sqrt(Σ (x_i - mean)² / (n - 1)) (the sample standard deviation, ddof = 1); 0.0 for n = 1;
    * ``ci95`` = mean ± t_{0.975, n-1} · std / sqrt(n), the 95 % Student-t interval of the mean over
      seeds; ``(nan, nan)`` for n = 1 (no spread to estimate).

    Raises:
        ValueError: empty input, NaN / infinite values, or not 1-D.
    """
    x = _as_values(values, "values")
    n = int(x.size)
    mean = float(x.mean())
    if n == 1:
        return SeedSummary(mean=mean, std=0.0, n=1, ci95=(math.nan, math.nan))
    std = float(x.std(ddof=1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return SeedSummary(mean=mean, std=std, n=n, ci95=(mean - half, mean + half))


def paired_seeds(a: Any, b: Any) -> PairedTest:
    """Paired t-test over seeds: model a against model b, ``a[i]`` and ``b[i]`` from the same seed.

    With d_i = a_i - b_i (n pairs), sd = the sample standard deviation of d (ddof = 1) and
    se = sd / sqrt(n):

    * ``difference`` = mean(d);
    * ``ci95`` = mean(d) ± t_{0.975, n-1} · se;
    * ``p_value`` = P(|T_{n-1}| ≥ |mean(d) / se|), the two-sided paired t-test
      (``scipy.stats.ttest_rel``'s value).

    Edge cases: n = 1 → interval and p-value ``nan`` (inconclusive); sd = 0 (every seed moves by
    exactly the same amount) → interval (mean(d), mean(d)) and p = 0 if mean(d) ≠ 0, p = 1 if it is 0.

    Raises:
        ValueError: mismatched lengths, empty input, NaN / infinite values.
    """
    x, y = _as_pair(a, b, "seeds")
    d = x - y
    n = int(d.size)
    mean = float(d.mean())
    if n == 1:
        return PairedTest(mean, (math.nan, math.nan), math.nan, 1, "paired-t", math.nan, df=None)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
        return PairedTest(mean, (mean, mean), p, n, "paired-t", 0.0, df=n - 1)
    half = t_quantile(0.975, n - 1) * se
    p = t_sf2(mean / se, n - 1)
    return PairedTest(mean, (mean - half, mean + half), p, n, "paired-t", se, df=n - 1)


# ---------------------------------------------------------------------------------------------------
# Queries: paired bootstrap
# ---------------------------------------------------------------------------------------------------


def _percentile_interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(resampled, [tail, 1.0 - tail])  # numpy's default "linear" (type 7) quantile
    return (float(lo), float(hi))


def paired_bootstrap(
    a: Any,
    b: Any,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    statistic: Callable[..., Any] = np.mean,
) -> PairedTest:
    """Paired bootstrap over queries: per-query scores ``a[i]`` and ``b[i]`` of two models on query i.

    Each resample r draws n query indices uniformly with replacement (the same indices for a and b,
    which is what makes it paired) and computes d*_r = statistic(a[idx]) - statistic(b[idx]).

    * ``difference`` = statistic(a) - statistic(b) on the original queries;
    * ``ci95`` = the 2.5 % and 97.5 % percentiles of d*_1..d*_B (the percentile bootstrap interval;
      numpy's default linear-interpolation quantile);
    * ``p_value`` = min(1, 2 · (min(L, U) + 1) / (B + 1)) with L = #{d*_r ≤ 0} and U = #{d*_r ≥ 0}:
      the *sign-based* bootstrap p-value — the fraction of resampled differences on the other side
      of 0 from the bulk, doubled, clipped to 1, with the +1 correction (Davison & Hinkley 1997)
      so that it is never exactly 0 (its floor is 2 / (B + 1)). It agrees with the interval: p < 0.05
      exactly when (up to the +1 and interpolation) the 95 % percentile interval excludes 0. It is
      *not* the "shifted" (null-recentred) bootstrap test.
    * ``std_error`` = the standard deviation (ddof = 1) of the d*_r.

    Deterministic for a given ``seed`` (``numpy.random.default_rng(seed)``; indices are drawn in row
    chunks of at most ``_CHUNK_ELEMENTS`` elements, and the stream does not depend on the chunking).
    10,000 resamples × 100,000 queries draws 10⁹ indices: about 7 s and 140 MB peak memory on one core.

    Args:
        statistic: called as ``statistic(matrix, axis=1)`` on the (chunk, n) resampled scores and as
            ``statistic(vector)`` on the originals (``np.mean``, ``np.median``, ... work).

    Raises:
        ValueError: mismatched lengths, empty input, fewer than 2 queries, NaN / infinite values,
            ``n_resamples`` < 1.
    """
    x, y = _as_pair(a, b, "queries")
    n = int(x.size)
    if n < 2:
        raise ValueError("paired_bootstrap needs at least 2 queries to resample")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    n_resamples = int(n_resamples)
    use_diff = statistic is np.mean  # mean(a) - mean(b) = mean(a - b): one gather instead of two
    d = x - y
    difference = float(statistic(x)) - float(statistic(y))
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        if use_diff:
            out[start:stop] = d[idx].mean(axis=1)
        else:
            out[start:stop] = np.asarray(statistic(x[idx], axis=1), dtype=np.float64) - np.asarray(
                statistic(y[idx], axis=1), dtype=np.float64
            )
        del idx
    if not np.isfinite(out).all():
        raise ValueError("statistic returned NaN or infinite values on bootstrap resamples")
    out.setflags(write=False)
    below, above = int((out <= 0.0).sum()), int((out >= 0.0).sum())
    p = min(1.0, 2.0 * (min(below, above) + 1) / (n_resamples + 1))
    se = float(out.std(ddof=1)) if n_resamples > 1 else 0.0
    return PairedTest(
        difference=difference,
        ci95=_percentile_interval(out, 0.95),
        p_value=p,
        n=n,
        method="bootstrap",
        std_error=se,
        df=None,
        n_resamples=n_resamples,
        resampled=out,
    )


# ---------------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------------


def verdict(test: PairedTest, *, alpha: float = 0.05) -> Verdict:
    """Read a paired test as evidence for the claim "a > b".

    With (low, high) the two-sided (1 - alpha) interval of a - b (``test.ci95`` for alpha = 0.05,
    ``test.interval(1 - alpha)`` otherwise):

    * ``"supported"`` when low > 0 (the interval excludes 0 on the claimed side);
    * ``"contradicted"`` when high < 0 (it excludes 0 on the other side: b > a);
    * ``"inconclusive"`` otherwise, including an interval that touches 0 or is undefined (nan).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lo, hi = test.ci95 if alpha == 0.05 else test.interval(1.0 - alpha)
    if lo > 0.0:
        return "supported"
    if hi < 0.0:
        return "contradicted"
    return "inconclusive"


# ---------------------------------------------------------------------------------------------------
# Per-query scores of a finished evaluation
# ---------------------------------------------------------------------------------------------------

_METRIC = re.compile(r"^(recall|mrr|ndcg)@([1-9][0-9]*)$")


def per_query_scores(rankings: str | os.PathLike, task: str, metric: str = "recall@10") -> dict[str, float]:
    """``{query_id: score}`` of retrieval task ``task`` from a ``moon eval`` ``rankings.jsonl``.

    ``metric`` is ``recall@k``, ``mrr@k`` or ``ndcg@k`` (k ≤ 100, the ranked ids kept per query),
    computed by :mod:`moon.bench.metrics` from each row's ``ranked_product_ids`` and
    ``relevant_product_ids`` — so the mean over the queries is the task's reported metric. Raises
    ``ValueError`` for an unknown metric, a task with no rows, or rows without
    ``relevant_product_ids`` (written before they were recorded: run ``moon eval`` again)."""
    from moon.bench import metrics as m

    found = _METRIC.match(metric)
    if found is None:
        raise ValueError(f"metric {metric!r}: expected recall@k, mrr@k or ndcg@k")
    kind, k = found.group(1), int(found.group(2))
    fn = {"recall": m.recall_at_k, "mrr": m.mrr_at_k, "ndcg": m.ndcg_at_k}[kind]
    scores: dict[str, float] = {}
    with open(rankings, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or row.get("task") != task:
                continue
            if "relevant_product_ids" not in row:
                raise ValueError(
                    f"{rankings}:{n}: no relevant_product_ids (written by an older moon eval, or not a retrieval "
                    "task); run moon eval again"
                )
            ranked = row.get("ranked_product_ids") or []
            if k > len(ranked) and len(ranked) >= 100:
                raise ValueError(f"metric {metric!r}: rankings keep only the top {len(ranked)}")
            scores[str(row["query_id"])] = float(fn(ranked, set(row["relevant_product_ids"]), k))
    if not scores:
        raise ValueError(f"{rankings}: no rows for task {task!r}")
    return scores


def align(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Two ``{query_id: score}`` maps → two arrays over the same query ids (sorted), for the paired
    tests; ``ValueError`` when the query sets differ (the runs did not score the same queries)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(
            f"the runs scored different queries: {len(only_a)} only in the first (e.g. {only_a[:3]}), "
            f"{len(only_b)} only in the second (e.g. {only_b[:3]}); evaluate both with the same --seed and "
            "--max-queries"
        )
    ids = sorted(a)
    return np.array([a[i] for i in ids], dtype=float), np.array([b[i] for i in ids], dtype=float)
