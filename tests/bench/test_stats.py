"""moon.bench.stats against known answers: t tables, closed forms, hand-computed tests, exact bootstrap cases."""

import math

import numpy as np
import pytest

from moon.bench import stats
from moon.bench.stats import (
    PairedTest,
    betainc,
    paired_bootstrap,
    paired_seeds,
    seed_summary,
    t_cdf,
    t_quantile,
    t_sf2,
    verdict,
)

# Two-sided 95 % critical values t_{0.975, df} from a standard printed t table (3 decimals).
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


# --- the t distribution ------------------------------------------------------------------------------


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=6e-4)  # table rounded to 3 decimals
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=6e-4)


def test_t_quantile_known_values_and_normal_limit():
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0.975, 9) == pytest.approx(2.262, abs=1e-3)
    # df = 1 is the Cauchy distribution: quantile tan(pi (q - 1/2)); df = 2: (2q - 1) sqrt(2 / (4q(1 - q)))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    q = 0.9
    assert t_quantile(q, 2) == pytest.approx((2 * q - 1) * math.sqrt(2 / (4 * q * (1 - q))), rel=1e-9)
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile


def test_t_p_values_known():
    assert t_sf2(2.776, 4) == pytest.approx(0.05, abs=1e-3)
    assert t_sf2(12.706, 1) == pytest.approx(0.05, abs=1e-3)
    assert t_sf2(-2.262, 9) == pytest.approx(0.05, abs=1e-3)
    assert t_sf2(0.0, 1) == 1.0
    assert t_sf2(0.0, 25) == 1.0
    assert t_sf2(math.inf, 3) == 0.0
    # closed forms: df = 1 (Cauchy) p = 1 - (2/pi) atan|t|; df = 2 p = 1 - |t| / sqrt(2 + t^2)
    for t in (0.3, 1.0, 4.0, 50.0):
        assert t_sf2(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
        assert t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_cdf(1.0, 1) == pytest.approx(0.75, rel=1e-12)
    assert t_cdf(-1.0, 1) == pytest.approx(0.25, rel=1e-12)
    assert t_cdf(1.959964, 1e7) == pytest.approx(0.975, abs=1e-6)


def test_t_quantile_inverts_the_cdf():
    for df in (1, 3, 7.5, 40):
        for q in (0.6, 0.9, 0.99, 0.9995):
            assert t_cdf(t_quantile(q, df), df) == pytest.approx(q, abs=1e-10)


def test_betainc_closed_forms():
    for x in (0.01, 0.3, 0.5, 0.77, 0.999):
        assert betainc(2.5, 1.0, x) == pytest.approx(x**2.5, rel=1e-10)  # I_x(a, 1) = x^a
        assert betainc(1.0, 3.0, x) == pytest.approx(1 - (1 - x) ** 3, rel=1e-10)  # I_x(1, b)
    assert betainc(7.0, 7.0, 0.5) == pytest.approx(0.5, rel=1e-12)  # symmetry
    assert betainc(0.5, 0.5, 0.25) == pytest.approx(2 / math.pi * math.asin(0.5), rel=1e-10)  # arcsine law
    assert betainc(3.0, 4.0, 0.0) == 0.0
    assert betainc(3.0, 4.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="x"):
        betainc(1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="a > 0"):
        betainc(0.0, 1.0, 0.5)


def test_t_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_sf2(1.0, 0)
    with pytest.raises(ValueError, match="quantile level"):
        t_quantile(1.0, 3)


# --- seeds -----------------------------------------------------------------------------------------


def test_seed_summary_one_to_four():
    s = seed_summary([1, 2, 3, 4])
    assert s.n == 4
    assert s.mean == 2.5
    assert s.std == pytest.approx(1.2910, abs=1e-4)
    assert s.std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    half = 3.182 * 1.2910 / 2
    assert s.ci95[0] == pytest.approx(2.5 - half, abs=1e-3)
    assert s.ci95[1] == pytest.approx(2.5 + half, abs=1e-3)
    assert s.format(scale=1, digits=2) == "2.50 ± 1.29 (n=4)"


def test_seed_summary_single_value_and_constant():
    one = seed_summary([0.42])
    assert (one.mean, one.std, one.n) == (0.42, 0.0, 1)
    assert math.isnan(one.ci95[0]) and math.isnan(one.ci95[1])
    const = seed_summary(np.full(5, 0.3))
    assert const.std == pytest.approx(0.0, abs=1e-15)
    assert const.ci95 == pytest.approx((0.3, 0.3))


def test_paired_seeds_hand_computed_t_test():
    # d = a - b = [1, 2, 3, 4]: mean 2.5, sd sqrt(5/3), se = sd / 2 = 0.645497, t = 3.872983, df = 3
    a, b = [3.0, 5.0, 4.0, 9.0], [2.0, 3.0, 1.0, 5.0]
    r = paired_seeds(a, b)
    assert r.method == "paired-t" and r.n == 4 and r.df == 3
    assert r.difference == 2.5
    assert r.std_error == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    assert 2.5 / r.std_error == pytest.approx(3.872983, abs=1e-6)
    assert r.p_value == pytest.approx(0.0304663, abs=1e-6)  # scipy.stats.ttest_rel(a, b).pvalue
    assert r.ci95[0] == pytest.approx(0.4457397, abs=1e-6)  # ... .confidence_interval()
    assert r.ci95[1] == pytest.approx(4.5542603, abs=1e-6)
    assert r.ci95 == pytest.approx((2.5 - 3.182 * r.std_error, 2.5 + 3.182 * r.std_error), abs=1e-3)
    assert verdict(r) == "supported"
    assert verdict(r, alpha=0.01) == "inconclusive"  # p = 0.030 > 0.01: the 99 % interval contains 0
    assert r.interval(0.99)[0] < 0 < r.interval(0.99)[1]
    assert r.interval(0.95) == pytest.approx(r.ci95)


def test_paired_seeds_boundary_case():
    # d = [0.02, 0.02, 0, 0.04, 0.01]: mean 0.018, sd sqrt(2.2e-4), t = 2.7136 (df 4) -> p = 0.0533
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.78, 0.80, 0.79, 0.81, 0.80]
    r = paired_seeds(a, b)
    assert r.difference == pytest.approx(0.018, abs=1e-12)
    assert r.p_value == pytest.approx(0.053338, abs=1e-5)
    assert r.ci95[0] < 0 < r.ci95[1]
    assert verdict(r) == "inconclusive"
    assert verdict(paired_seeds(b, a)) == "inconclusive"


def test_paired_seeds_degenerate_cases():
    same = paired_seeds([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same.difference, same.ci95, same.p_value) == (0.0, (0.0, 0.0), 1.0)
    assert verdict(same) == "inconclusive"
    shifted = paired_seeds([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])  # every seed moves by exactly +0.5
    assert (shifted.difference, shifted.ci95, shifted.p_value) == (0.5, (0.5, 0.5), 0.0)
    assert verdict(shifted) == "supported"
    one = paired_seeds([0.9], [0.1])
    assert one.difference == pytest.approx(0.8)
    assert math.isnan(one.p_value) and math.isnan(one.ci95[0])
    assert verdict(one) == "inconclusive"


# --- queries: paired bootstrap ---------------------------------------------------------------------


def test_bootstrap_exact_shift():
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 0.8, size=200)
    r = paired_bootstrap(b + 0.1, b, n_resamples=2000)
    assert r.method == "bootstrap" and r.n == 200 and r.n_resamples == 2000
    assert r.difference == pytest.approx(0.1, abs=1e-12)
    assert r.ci95 == pytest.approx((0.1, 0.1), abs=1e-12)
    assert r.p_value == pytest.approx(2 / 2001)  # the floor: no resample on the other side of 0
    assert r.std_error == pytest.approx(0.0, abs=1e-12)
    assert verdict(r) == "supported"
    assert verdict(paired_bootstrap(b, b + 0.1, n_resamples=2000)) == "contradicted"


def test_bootstrap_identical_models():
    b = np.random.default_rng(2).uniform(size=100)
    r = paired_bootstrap(b, b.copy(), n_resamples=1000)
    assert r.difference == 0.0
    assert r.ci95 == (0.0, 0.0)
    assert r.p_value == 1.0
    assert verdict(r) == "inconclusive"


def test_bootstrap_hand_checked_small_case():
    # d = a - b = [1, 0]: every resample mean is 0, 1/2 or 1 -> no resample < 0, P(d* = 0) = 1/4
    r = paired_bootstrap([1.0, 0.0], [0.0, 0.0], n_resamples=4000, seed=3)
    assert r.difference == 0.5
    assert r.ci95 == (0.0, 1.0)
    assert r.p_value == pytest.approx(2 * 0.25, abs=0.05)  # 2 · #{d* <= 0} / B, #{d* = 0} ~ B/4
    frac_zero = float(np.mean(r.resampled == 0.0))
    assert r.p_value == pytest.approx(min(1.0, 2 * (frac_zero * 4000 + 1) / 4001))
    assert verdict(r) == "inconclusive"


def test_bootstrap_agrees_with_normal_theory_for_the_mean():
    rng = np.random.default_rng(4)
    b = rng.uniform(size=2000)
    a = b + 0.02 + rng.normal(0, 0.3, size=2000)
    r = paired_bootstrap(a, b, n_resamples=4000)
    d = a - b
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert r.difference == pytest.approx(d.mean(), rel=1e-12)
    assert r.std_error == pytest.approx(se, rel=0.05)
    assert r.ci95[0] == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * se)
    assert r.ci95[1] == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * se)
    # the p-value of a 1.96·se-wide interval: the normal two-sided tail at z = mean / se
    z = d.mean() / se
    assert r.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.01)


def test_bootstrap_coverage():
    """200 simulated studies of 50 queries with a known true difference: the 95 % interval covers it ~95 %."""
    rng = np.random.default_rng(12345)
    true_diff, hits = 0.05, 0
    for rep in range(200):
        b = rng.uniform(0.2, 0.9, size=50)
        a = b + true_diff + rng.normal(0, 0.2, size=50)  # E[a - b] = true_diff
        lo, hi = paired_bootstrap(a, b, n_resamples=2000, seed=rep).ci95
        hits += lo <= true_diff <= hi
    assert 180 <= hits <= 198, hits  # 90-99 %


def test_bootstrap_pairing_matters():
    # large between-query spread shared by both models, a small consistent gain: paired sees it
    rng = np.random.default_rng(5)
    b = rng.uniform(0, 1, size=300)
    a = b + 0.01 + rng.normal(0, 0.005, size=300)
    r = paired_bootstrap(a, b, n_resamples=2000)
    assert verdict(r) == "supported"
    assert r.ci95[1] - r.ci95[0] < 0.003  # an unpaired interval would be ~0.09 wide


def test_bootstrap_is_deterministic_and_chunking_does_not_change_it(monkeypatch):
    rng = np.random.default_rng(6)
    a, b = rng.uniform(size=300), rng.uniform(size=300)
    r1 = paired_bootstrap(a, b, n_resamples=500, seed=7)
    r2 = paired_bootstrap(a, b, n_resamples=500, seed=7)
    assert r1 == r2
    assert np.array_equal(r1.resampled, r2.resampled)
    r3 = paired_bootstrap(a, b, n_resamples=500, seed=8)
    assert r3.ci95 != r1.ci95
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 7 * 300)  # 7 resamples per chunk instead of all at once
    r4 = paired_bootstrap(a, b, n_resamples=500, seed=7)
    assert np.array_equal(r4.resampled, r1.resampled)
    assert r4 == r1


def test_bootstrap_other_statistic_and_levels():
    a = [0.0, 1.0, 1.0, 1.0, 0.5]
    b = [0.0, 0.0, 1.0, 0.5, 0.5]
    r = paired_bootstrap(a, b, n_resamples=3000, statistic=np.median)
    assert r.difference == pytest.approx(1.0 - 0.5)
    assert not r.resampled.flags.writeable
    lo90, hi90 = r.interval(0.90)
    assert r.ci95[0] <= lo90 <= hi90 <= r.ci95[1]
    assert r.interval(0.95) == r.ci95
    assert np.quantile(r.resampled, 0.025) == r.ci95[0]


# --- verdict ---------------------------------------------------------------------------------------


def _test(lo, hi):
    return PairedTest(difference=(lo + hi) / 2, ci95=(lo, hi), p_value=0.5, n=10, method="paired-t", std_error=1.0)


def test_verdict_directions():
    assert verdict(_test(0.01, 0.05)) == "supported"
    assert verdict(_test(-0.05, -0.01)) == "contradicted"
    assert verdict(_test(-0.01, 0.05)) == "inconclusive"
    assert verdict(_test(0.0, 0.05)) == "inconclusive"  # touching 0 is not excluding it
    assert verdict(_test(-0.05, 0.0)) == "inconclusive"
    assert verdict(_test(math.nan, math.nan)) == "inconclusive"
    with pytest.raises(ValueError, match="alpha"):
        verdict(_test(0.01, 0.05), alpha=0.0)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [paired_bootstrap, paired_seeds])
def test_paired_functions_reject_bad_input(fn):
    with pytest.raises(ValueError, match="mismatched lengths: a has 3 values but b has 2"):
        fn([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="a: empty input"):
        fn([], [])
    with pytest.raises(ValueError, match="b: contains NaN at position 1"):
        fn([0.1, 0.2, 0.3], [0.1, math.nan, 0.3])
    with pytest.raises(ValueError, match="a: contains an infinite value at position 0"):
        fn([math.inf, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="1-D"):
        fn([[0.1, 0.2]], [[0.1, 0.2]])


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(ValueError, match="at least 2 queries"):
        paired_bootstrap([0.5], [0.4])
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap([0.5, 0.6], [0.4, 0.5], n_resamples=0)


def test_seed_summary_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        seed_summary([])
    with pytest.raises(ValueError, match="NaN at position 2"):
        seed_summary([0.1, 0.2, float("nan")])
    with pytest.raises(ValueError, match="not a sequence of numbers"):
        seed_summary(["a", "b"])


# --- end to end on a tiny evaluation -----------------------------------------------------------------


def test_per_query_scores_from_an_evaluation_feed_the_bootstrap(store_dir):
    """Per-query Recall@10 from an in-memory EvalResult averages to the reported metric, and compares."""
    from moon.bench import evaluate
    from moon.bench.metrics import recall_at_k
    from moon.models import load_embedder

    first, second = (evaluate(load_embedder(f"random:{s}"), store_dir, tasks=["retrieval"]) for s in (0, 1))
    checked = 0
    for name in (t.spec.name for t in first.tasks):
        t1, t2 = first.task(name), second.task(name)
        if not t1.query_ids:
            continue
        assert t1.query_ids == t2.query_ids  # same queries, same order: paired
        s1, s2 = ([recall_at_k(r, rel, 10) for r, rel in zip(t.rankings, t.relevant, strict=True)] for t in (t1, t2))
        assert np.mean(s1) == pytest.approx(t1.metrics["recall@10"], abs=1e-12)
        assert np.mean(s2) == pytest.approx(t2.metrics["recall@10"], abs=1e-12)
        test = paired_bootstrap(s1, s2, n_resamples=500)
        assert test.difference == pytest.approx(t1.metrics["recall@10"] - t2.metrics["recall@10"], abs=1e-12)
        assert test.ci95[0] <= test.difference <= test.ci95[1]
        checked += 1
    assert checked >= 2


def test_per_query_scores_from_rankings_jsonl_average_to_the_reported_metrics(store_dir, tmp_path):
    """A written evaluation's rankings.jsonl gives back, per query, the scores its results.json averaged."""
    import json

    from moon.bench import evaluate
    from moon.bench.report import write_results
    from moon.bench.stats import align, per_query_scores
    from moon.models import load_embedder

    outs = []
    for s in (0, 1):
        write_results(evaluate(load_embedder(f"random:{s}"), store_dir, tasks=["retrieval"]), tmp_path / f"r{s}",
                      plots=False)  # fmt: skip
        outs.append(tmp_path / f"r{s}")
    results = json.loads((outs[0] / "results.json").read_text())
    checked = 0
    for task, scored in results["tasks"].items():
        if not scored.get("n_queries"):
            continue
        for metric in ("recall@10", "mrr@10", "ndcg@10", "recall@1"):
            per = per_query_scores(outs[0] / "rankings.jsonl", task, metric)
            assert len(per) == scored["n_queries"]
            assert np.mean(list(per.values())) == pytest.approx(scored["metrics"][metric], abs=1e-12), (task, metric)
        a, b = align(
            per_query_scores(outs[0] / "rankings.jsonl", task), per_query_scores(outs[1] / "rankings.jsonl", task)
        )
        assert len(a) == len(b) == scored["n_queries"]
        checked += 1
    assert checked >= 2
    with pytest.raises(ValueError, match="recall@k, mrr@k or ndcg@k"):
        per_query_scores(outs[0] / "rankings.jsonl", "text2product", "precision@10")
    with pytest.raises(ValueError, match="no rows for task"):
        per_query_scores(outs[0] / "rankings.jsonl", "no-such-task")
    with pytest.raises(ValueError, match="different queries: 1 only in the first"):
        align({"q1": 1.0, "q2": 0.0}, {"q2": 1.0})
    old = tmp_path / "old.jsonl"  # rankings written before relevant ids were recorded
    old.write_text(json.dumps({"task": "text2product", "query_id": "q", "ranked_product_ids": ["p"]}) + "\n")
    with pytest.raises(ValueError, match="run moon eval again"):
        per_query_scores(old, "text2product")
