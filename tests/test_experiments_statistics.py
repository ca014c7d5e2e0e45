"""Experiment statistics against independent references: exact formulas, adaptive quadrature,
seeded Monte Carlo, scipy's own tests, and the figures GrowthBook's gbstats publishes in its tests."""

import math
import warnings
from typing import Any

import numpy as np
import pytest
from scipy import integrate, special, stats

from autoexec_dagster.experiments.statistics import (
    Interval,
    beta_binomial_best,
    difference_interval,
    gaussian_best,
    relative_lift_interval,
    srm_p_value,
    thompson_weights,
    thompson_weights_gaussian,
    top_two_weights,
    top_two_weights_gaussian,
)


def beta_reference(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(best) and expected loss by scipy's adaptive quadrature, arm by arm.

    Arm i's density is negligible outside its mean +- 25 sd, so P(best)_i and its share of
    E[max] are integrated there; the loss is E[max] - E[p_i].
    """
    k = alpha.size
    mean = alpha / (alpha + beta)
    sd = np.sqrt(alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1)))

    def density(i: int, x: float) -> float:
        return math.exp(
            special.xlogy(alpha[i] - 1, x)
            + special.xlog1py(beta[i] - 1, -x)
            - special.betaln(alpha[i], beta[i])
        )

    def others(i: int, x: float) -> float:
        cdf = special.betainc(alpha, beta, x)
        return float(np.prod(np.delete(cdf, i)))

    probability = np.zeros(k)
    top = 0.0
    for i in range(k):
        low, high = max(0.0, mean[i] - 25 * sd[i]), min(1.0, mean[i] + 25 * sd[i])
        options = {"points": [mean[i]], "limit": 400, "epsabs": 1e-14, "epsrel": 1e-11}
        probability[i] = integrate.quad(
            lambda x, i=i: density(i, x) * others(i, x), low, high, **options
        )[0]
        top += integrate.quad(
            lambda x, i=i: x * density(i, x) * others(i, x), low, high, **options
        )[0]
    return probability, top - mean


def beta_evan_miller(a1: float, b1: float, a2: int, b2: float) -> float:
    """P(p2 > p1) for p1 ~ Beta(a1, b1), p2 ~ Beta(a2, b2), a2 an integer (Evan Miller)."""
    i = np.arange(a2)
    return float(
        np.sum(
            np.exp(
                special.betaln(a1 + i, b1 + b2)
                - np.log(b2 + i)
                - special.betaln(1 + i, b2)
                - special.betaln(a1, b1)
            )
        )
    )


CASES = [
    ([0], [0]),
    ([7], [10]),
    ([0, 0], [0, 0]),
    ([49, 51], [100, 100]),
    ([0, 3], [10_000_000, 10_000_000]),
    ([10_000_000, 9_999_998], [10_000_000, 10_000_000]),
    ([0, 1, 0], [10, 10, 0]),
    ([10, 10, 10], [10, 10, 10]),
    ([100, 110, 95, 120, 118], [1000, 1000, 1000, 1000, 1000]),
    ([1_000_000, 1_000_500, 999_000, 1_001_200], [10_000_000] * 4),
    ([5, 50, 500, 5000, 50_000], [100, 1000, 10_000, 100_000, 1_000_000]),
    (list(range(0, 100, 10)), [100] * 10),
    ([0] * 10, [1000] * 10),
    (
        [120, 0, 3000, 999_999, 4, 17, 250_000, 1, 60, 8],
        [1000, 0, 30_000, 10_000_000, 40, 170, 2_500_000, 10, 600, 80],
    ),
]


@pytest.mark.parametrize(("conversions", "n"), CASES)
def test_beta_binomial_best_matches_adaptive_quadrature(
    conversions: list[int], n: list[int]
) -> None:
    probability, loss = beta_binomial_best(conversions, n)
    alpha = 1.0 + np.asarray(conversions, dtype=float)
    beta = 1.0 + np.asarray(n, dtype=float) - np.asarray(conversions, dtype=float)
    expected_probability, expected_loss = beta_reference(alpha, beta)
    assert probability.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(probability, expected_probability, atol=1e-6)
    np.testing.assert_allclose(loss, np.maximum(expected_loss, 0.0), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize(
    ("conversions", "n"),
    [
        ([49, 51], [100, 100]),
        ([10, 15], [1000, 1000]),
        ([0, 3], [10_000_000] * 2),
        ([999, 1000], [1000, 1000]),
    ],
)
def test_two_arms_match_the_closed_form(conversions: list[int], n: list[int]) -> None:
    probability, _loss = beta_binomial_best(conversions, n)
    a1, b1 = 1 + conversions[0], 1 + n[0] - conversions[0]
    a2, b2 = 1 + conversions[1], 1 + n[1] - conversions[1]
    assert probability[1] == pytest.approx(beta_evan_miller(a1, b1, a2, b2), abs=1e-7)


@pytest.mark.parametrize(
    ("conversions", "n", "seed"),
    [
        ([3, 5], [40, 40], 1),
        ([100, 110, 95, 120, 118], [1000] * 5, 2),
        ([0, 0, 1], [500, 500, 500], 3),
        ([200, 200], [200, 200], 4),
        ([1000, 1010, 1020, 990, 1005, 1000, 995, 1015, 1030, 980], [10_000] * 10, 5),
        ([100_000, 100_300, 99_800], [1_000_000] * 3, 6),
    ],
)
def test_beta_binomial_best_matches_seeded_monte_carlo(
    conversions: list[int], n: list[int], seed: int
) -> None:
    draws = 200_000
    successes, trials = np.asarray(conversions), np.asarray(n)
    rng = np.random.default_rng(seed)
    sample = rng.beta(1 + successes, 1 + trials - successes, size=(draws, successes.size))
    mc_probability = np.bincount(sample.argmax(axis=1), minlength=successes.size) / draws
    regret = sample.max(axis=1)[:, None] - sample
    mc_loss, loss_se = regret.mean(axis=0), regret.std(axis=0) / math.sqrt(draws)
    probability, loss = beta_binomial_best(conversions, n)
    # 5 Monte Carlo standard errors: the draw's own noise, not the integration's error.
    probability_se = np.sqrt(mc_probability * (1 - mc_probability) / draws)
    assert np.all(np.abs(probability - mc_probability) <= 5 * probability_se + 1e-9)
    assert np.all(np.abs(loss - mc_loss) <= 5 * loss_se + 1e-12)


@pytest.mark.parametrize(("conversions", "n"), [([0, 1], [1000, 1000]), ([0, 5, 2], [0, 50, 20])])
def test_jeffreys_prior_with_infinite_densities(conversions: list[int], n: list[int]) -> None:
    # Beta(0.5, 0.5) priors: zero conversions leave a density infinite at 0.
    probability, loss = beta_binomial_best(conversions, n, prior_alpha=0.5, prior_beta=0.5)
    alpha = 0.5 + np.asarray(conversions, dtype=float)
    beta = 0.5 + np.asarray(n, dtype=float) - np.asarray(conversions, dtype=float)
    expected_probability, expected_loss = beta_reference(alpha, beta)
    np.testing.assert_allclose(probability, expected_probability, atol=1e-6)
    np.testing.assert_allclose(loss, expected_loss, atol=1e-6)


def test_all_conversions_mirror_zero_conversions() -> None:
    # p = 1 - q: with two arms, P(p_1 best) = P(q_2 best) and the loss of p_1 is the loss of
    # q_2 (E[max p] - E[p_1] = E[q_1] - E[min q] = E[max q] - E[q_2]). With a Jeffreys prior
    # the densities are infinite at 1, where floating point cannot place x itself.
    for prior in (0.5, 1.0):
        probability, loss = beta_binomial_best(
            [1000, 999], [1000, 1000], prior_alpha=prior, prior_beta=prior
        )
        mirror_probability, mirror_loss = beta_binomial_best(
            [0, 1], [1000, 1000], prior_alpha=prior, prior_beta=prior
        )
        np.testing.assert_allclose(probability, mirror_probability[::-1], atol=1e-7)
        np.testing.assert_allclose(loss, mirror_loss[::-1], atol=1e-9)


def test_gbstats_published_beta_risk() -> None:
    # gbstats 0.1 tests/test_main.py: binomial_ab_test(49, 100, 51, 100) has "risk"
    # [0.03872, 0.01912] (Beta(1, 1) prior, Gauss-Jacobi quadrature of E[max] - E[p]).
    _probability, loss = beta_binomial_best([49, 51], [100, 100])
    np.testing.assert_array_equal(np.round(loss, 5), [0.03872, 0.01912])


def test_gbstats_published_gaussian_risk() -> None:
    # gbstats 0.1: gaussian_ab_test(10, 0.5, 10, 10.5, 1, 10) has "risk" [0.51256, 0.01256];
    # its posteriors are N(10, 0.5^2 / 10) and N(10.5, 1 / 10). (Its chance_to_win 0.92427
    # is a log-normal approximation; the exact P(B > A) is Phi(0.5 / sqrt(0.125)) = 0.92135.)
    probability, loss = gaussian_best([10, 10.5], [0.25 / 10, 1 / 10])
    np.testing.assert_array_equal(np.round(loss, 5), [0.51256, 0.01256])
    assert probability[1] == pytest.approx(stats.norm.cdf(0.5 / math.sqrt(0.125)), abs=1e-9)


def test_lone_arm_and_symmetric_arms() -> None:
    probability, loss = beta_binomial_best([3], [10])
    assert probability.tolist() == [1.0] and loss.tolist() == [0.0]
    probability, loss = beta_binomial_best([50] * 4, [500] * 4)
    np.testing.assert_allclose(probability, 0.25, atol=1e-12)
    assert np.ptp(loss) < 1e-15
    probability, loss = gaussian_best([2.0, 2.0, 2.0], [0.1, 0.1, 0.1])
    np.testing.assert_allclose(probability, 1 / 3, atol=1e-12)


def test_results_follow_the_arms_when_permuted() -> None:
    conversions, n = np.array([12, 30, 7, 19]), np.array([100, 250, 90, 160])
    order = np.array([2, 0, 3, 1])
    probability, loss = beta_binomial_best(conversions, n)
    permuted_probability, permuted_loss = beta_binomial_best(conversions[order], n[order])
    np.testing.assert_allclose(permuted_probability, probability[order], atol=1e-12)
    np.testing.assert_allclose(permuted_loss, loss[order], atol=1e-14)


def test_probabilities_sum_to_one_on_random_inputs() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        k = int(rng.integers(1, 11))
        n = rng.integers(0, 10_000_000, size=k) // rng.integers(1, 10_000, size=k)
        conversions = rng.binomial(n, rng.uniform(0, 1, size=k))
        probability, loss = beta_binomial_best(conversions, n)
        assert probability.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(probability >= 0) and np.all(loss >= 0)
        # The arm with the highest posterior mean never has the larger loss of the two ends.
        mean = (1 + conversions) / (2 + n)
        assert loss[np.argmax(mean)] <= loss[np.argmin(mean)] + 1e-15


def test_gaussian_best_matches_closed_forms() -> None:
    means, variances = np.array([1.0, 1.3]), np.array([0.04, 0.09])
    probability, loss = gaussian_best(means, variances)
    theta = math.sqrt(variances.sum())
    d = (means[1] - means[0]) / theta
    expected_max = (
        means[1] * stats.norm.cdf(d) + means[0] * stats.norm.cdf(-d) + theta * stats.norm.pdf(d)
    )
    assert probability[1] == pytest.approx(stats.norm.cdf(d), abs=1e-10)
    np.testing.assert_allclose(loss, expected_max - means, atol=1e-10)


def test_gaussian_best_matches_seeded_monte_carlo() -> None:
    means = np.array([0.5, 0.52, 0.49, 0.55, 0.51, -3.0])
    variances = np.array([0.001, 0.0004, 0.002, 0.003, 0.0001, 4.0])
    rng = np.random.default_rng(21)
    sample = rng.normal(means, np.sqrt(variances), size=(200_000, means.size))
    mc_probability = np.bincount(sample.argmax(axis=1), minlength=means.size) / sample.shape[0]
    regret = sample.max(axis=1)[:, None] - sample
    probability, loss = gaussian_best(means, variances)
    se = np.sqrt(mc_probability * (1 - mc_probability) / sample.shape[0])
    assert np.all(np.abs(probability - mc_probability) <= 5 * se + 1e-9)
    loss_se = regret.std(axis=0) / math.sqrt(sample.shape[0])
    assert np.all(np.abs(loss - regret.mean(axis=0)) <= 5 * loss_se)


def test_gaussian_best_point_masses() -> None:
    probability, loss = gaussian_best([1.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    assert probability.tolist() == [0.5, 0.5, 0.0]
    assert loss.tolist() == [0.0, 0.0, 1.0]
    # A point mass at 1 against N(0.5, 1): arm 2 is best when it draws above 1.
    probability, loss = gaussian_best([1.0, 0.5], [0.0, 1.0])
    assert probability[1] == pytest.approx(stats.norm.sf(0.5), abs=1e-7)
    excess = stats.norm.pdf(0.5) - 0.5 * stats.norm.sf(0.5)  # E[(X - 1)+] for X ~ N(0.5, 1)
    np.testing.assert_allclose(loss, [excess, excess + 0.5], atol=1e-7)


def test_invalid_posterior_inputs_raise() -> None:
    with pytest.raises(ValueError, match="between 0 and n"):
        beta_binomial_best([5], [3])
    with pytest.raises(ValueError, match="differ in length"):
        beta_binomial_best([1, 2], [3])
    with pytest.raises(ValueError, match=">= 0"):
        gaussian_best([1.0, 2.0], [0.1, -0.1])
    with pytest.raises(ValueError, match="finite"):
        gaussian_best([1.0, math.nan], [0.1, 0.1])


# gbstats tests/frequentist/test_tests.py, TestTwoSidedTTest: SampleMeanStatistic(sum, sum of
# squares, n); the variance of one unit is (sum_squares - sum^2 / n) / (n - 1).
def _sample_mean(total: float, squares: float, n: int) -> tuple[float, float, int]:
    return total / n, (squares - total**2 / n) / (n - 1), n


GB_CONTROL = _sample_mean(1396.87, 52377.9767, 3407)
GB_TREATMENT = _sample_mean(2422.7, 134698.29, 3461)


def _rounded(interval: Interval) -> tuple[float, float, float, float]:
    return (
        round(interval.estimate, 5),
        round(interval.low, 5),
        round(interval.high, 5),
        round(interval.p_value, 5),
    )


def test_gbstats_published_relative_ttest() -> None:
    # expected 0.70732, ci (-0.03526, 1.44989), pValue 0.06191
    result = relative_lift_interval(*GB_TREATMENT, *GB_CONTROL)
    assert _rounded(result) == (0.70732, -0.03526, 1.44989, 0.06191)


def test_gbstats_published_absolute_ttest() -> None:
    # expected 0.29, ci (0.04538, 0.53462), pValue 0.02016
    result = difference_interval(*GB_TREATMENT, *GB_CONTROL)
    assert _rounded(result) == (0.29, 0.04538, 0.53462, 0.02016)


def test_gbstats_published_binomial_ttest() -> None:
    # ProportionStatistic(sum=14, n=28) against (16, 30): gbstats' variance of a 0/1 unit is
    # p (1 - p), without the n / (n - 1) correction. expected 0.06667, ci (-0.47767, 0.61101),
    # pValue 0.80707.
    control, treatment = 14 / 28, 16 / 30
    result = relative_lift_interval(
        treatment, treatment * (1 - treatment), 30, control, control * (1 - control), 28
    )
    assert _rounded(result) == (0.06667, -0.47767, 0.61101, 0.80707)


def test_difference_interval_matches_scipy_welch() -> None:
    rng = np.random.default_rng(5)
    treatment = rng.lognormal(0.1, 1.0, size=73)
    control = rng.lognormal(0.0, 0.6, size=151)
    reference: Any = stats.ttest_ind(
        treatment, control, equal_var=False
    )  # scipy's stubs lack pvalue
    bounds = reference.confidence_interval(confidence_level=0.9)
    result = difference_interval(
        float(treatment.mean()),
        float(treatment.var(ddof=1)),
        treatment.size,
        float(control.mean()),
        float(control.var(ddof=1)),
        control.size,
        confidence=0.9,
    )
    assert result.estimate == pytest.approx(treatment.mean() - control.mean(), abs=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert (result.low, result.high) == pytest.approx((bounds.low, bounds.high), rel=1e-9)


def test_relative_lift_interval_is_the_delta_method() -> None:
    result = relative_lift_interval(12.0, 9.0, 400, 10.0, 4.0, 500)
    se = math.sqrt(9.0 / (400 * 10.0**2) + 4.0 * 12.0**2 / (500 * 10.0**4))
    df = (9 / 400 + 4 / 500) ** 2 / ((9 / 400) ** 2 / 399 + (4 / 500) ** 2 / 499)
    width = stats.t.ppf(0.975, df) * se
    assert result.estimate == pytest.approx(0.2)
    assert (result.low, result.high) == pytest.approx((0.2 - width, 0.2 + width), rel=1e-12)
    assert result.p_value == pytest.approx(2 * stats.t.sf(0.2 / se, df), rel=1e-9)
    # A negative control mean: a rise from -10 to -5 is +50%, as in gbstats.
    assert relative_lift_interval(-5.0, 1.0, 50, -10.0, 1.0, 50).estimate == pytest.approx(0.5)


@pytest.mark.parametrize(
    "arguments",
    [
        (0.2, 0.16, 1, 0.1, 0.09, 100),  # one unit in treatment
        (0.2, 0.16, 100, 0.1, 0.09, 0),  # no control
        (0.0, 0.0, 100, 0.0, 0.0, 100),  # no variance at all
        (0.2, math.nan, 100, 0.1, 0.09, 100),
        (0.2, -1.0, 100, 0.1, 0.09, 100),
        (0.2, math.inf, 100, 0.1, 0.09, 100),
    ],
)
def test_degenerate_intervals_are_nan_without_warnings(
    arguments: tuple[float, float, float, float, float, float],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for function in (difference_interval, relative_lift_interval):
            result = function(*arguments)
            assert math.isnan(result.low) and math.isnan(result.high)
            assert math.isnan(result.p_value)


def test_zero_control_mean_has_no_relative_lift() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = relative_lift_interval(0.1, 0.09, 100, 0.0, 0.0, 100)
    assert math.isnan(result.estimate) and math.isnan(result.low)
    # The absolute difference is still defined: only the treatment varies.
    difference = difference_interval(0.1, 0.09, 100, 0.0, 0.0, 100)
    assert difference.low < 0.1 < difference.high and difference.p_value < 0.01


def test_gbstats_published_srm() -> None:
    # gbstats tests/test_gbstats.py test_srm: check_srm([1000, 1200], [0.5, 0.5]) rounded to 9
    # decimals is 0.000020079: chi2 = 2 * 100^2 / 1100 = 18.18 on 1 degree of freedom.
    assert round(srm_p_value([1000, 1200], [0.5, 0.5]), 9) == 0.000020079
    assert srm_p_value([1000, 1000], [0.5, 0.5]) == 1.0


def test_srm_matches_scipy_chisquare() -> None:
    observed = np.array([480, 260, 260])
    weights = np.array([0.5, 0.25, 0.25])
    expected = stats.chisquare(observed, f_exp=observed.sum() * weights).pvalue
    assert srm_p_value(observed, weights) == pytest.approx(expected, rel=1e-12)


def test_srm_per_period_conditions_on_each_period_total() -> None:
    # Three days with different weights; day 3 routes no one to arm c (weight 0).
    observed = np.array([[340, 330, 330], [520, 240, 240], [700, 300, 0]])
    weights = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25], [0.7, 0.3, 0.0]])
    cells = weights > 0
    expected_counts = observed.sum(axis=1, keepdims=True) * weights
    # scipy's dof is cells - 1 - ddof; each day's total is fixed, so dof = cells - days.
    reference = stats.chisquare(
        observed[cells], f_exp=expected_counts[cells], ddof=observed.shape[0] - 1
    ).pvalue
    assert srm_p_value(observed, weights) == pytest.approx(reference, rel=1e-12)
    # Pooling the days against their average weights would be a different (wrong) test.
    pooled = stats.chisquare(observed.sum(axis=0), f_exp=expected_counts.sum(axis=0)).pvalue
    assert srm_p_value(observed, weights) != pytest.approx(pooled, rel=1e-3)


def test_srm_edge_cases() -> None:
    assert srm_p_value([0, 0], [0.5, 0.5]) == 1.0  # no traffic
    assert srm_p_value([[10, 0], [5, 5]], [[1.0, 0.0], [0.5, 0.5]]) == 1.0  # nothing off
    assert srm_p_value([[0, 0], [600, 400]], [[0.5, 0.5], [0.5, 0.5]]) == pytest.approx(
        stats.chisquare([600, 400]).pvalue, rel=1e-12
    )
    # Traffic to an arm whose weight is 0 cannot happen by chance.
    assert srm_p_value([500, 499, 1], [0.5, 0.5, 0.0]) == 0.0
    with pytest.raises(ValueError, match="same"):
        srm_p_value([1, 2, 3], [0.5, 0.5])
    with pytest.raises(ValueError, match="positive weight"):
        srm_p_value([10, 10], [0.0, 0.0])


def test_srm_false_alarms_and_power_by_seed() -> None:
    design = np.full((5, 2), 0.5)
    alarms = caught = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        alarms += srm_p_value(rng.multinomial(1000, [0.5, 0.5], size=5), design) < 0.001
        caught += srm_p_value(rng.multinomial(1000, [0.55, 0.45], size=5), design) < 0.001
    assert alarms <= 3
    assert caught >= 297


def test_thompson_weights_equal_until_min_samples() -> None:
    weights, reason = thompson_weights(
        [30, 10, 12],
        [300, 120, 300],
        live=[True, True, True],
        min_samples=300,
        names=["control", "b", "c"],
    )
    np.testing.assert_allclose(weights, 1 / 3)
    assert reason == "equal: b has 120 of 300 samples"


def test_thompson_weights_follow_probability_best_with_a_floor() -> None:
    conversions, n = [100, 100, 300], [1000, 1000, 1000]
    weights, reason = thompson_weights(
        conversions,
        n,
        live=[True, True, True],
        min_samples=300,
        floor=0.05,
        names=["a", "b", "c"],
    )
    probability, _loss = beta_binomial_best(conversions, n)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert weights.min() >= 0.05 - 1e-12
    assert weights[2] == pytest.approx(0.9)
    assert reason.startswith("thompson: P(best) a 0.00, b 0.00, c 1.00") and "floor 5%" in reason
    assert probability[2] > 0.999


def test_thompson_weights_keep_ratios_above_the_floor() -> None:
    conversions, n = [100, 104, 108, 60], [1000] * 4
    weights, _reason = thompson_weights(conversions, n, live=[True] * 4, min_samples=1, floor=0.1)
    probability, _loss = beta_binomial_best(conversions, n)
    assert weights[3] == pytest.approx(0.1)
    free = weights[:3] / weights[:3].sum()
    np.testing.assert_allclose(free, probability[:3] / probability[:3].sum(), rtol=1e-9)


def test_thompson_weights_on_random_inputs_respect_the_floor() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        k = int(rng.integers(1, 9))
        n = rng.integers(0, 50_000, size=k)
        conversions = rng.binomial(n, rng.uniform(0, 0.3, size=k))
        live = rng.uniform(size=k) < 0.8
        live[rng.integers(k)] = True
        floor = float(rng.choice([0.0, 0.01, 0.05, 0.2]))
        weights, _reason = thompson_weights(
            conversions, n, live=live, min_samples=int(rng.integers(0, 2000)), floor=floor
        )
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(weights[~live] == 0)
        assert np.all(weights[live] >= min(floor, 1 / live.sum()) - 1e-12)


def test_thompson_weights_non_live_and_capped_floor() -> None:
    weights, reason = thompson_weights(
        [10, 50, 60], [100, 500, 500], live=[False, True, True], min_samples=10, floor=0.6
    )
    assert weights.tolist() == [0.0, 0.5, 0.5]  # a 60% floor for 2 arms caps at 50%
    assert reason.startswith("thompson:")
    weights, reason = thompson_weights([10, 50], [100, 500], live=[False, True], min_samples=10)
    assert weights.tolist() == [0.0, 1.0] and "single live arm" in reason
    with pytest.raises(ValueError, match="live"):
        thompson_weights([1, 2], [10, 10], live=[False, False], min_samples=1)


def test_thompson_weights_gaussian() -> None:
    weights, reason = thompson_weights_gaussian(
        [10.0, 10.5, 9.0],
        [0.025, 0.1, 0.01],
        [400, 400, 400],
        live=[True, True, True],
        min_samples=100,
        floor=0.01,
        names=["a", "b", "c"],
    )
    probability, _loss = gaussian_best([10.0, 10.5, 9.0], [0.025, 0.1, 0.01])
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert weights[2] == pytest.approx(0.01)
    assert weights[1] / weights[0] == pytest.approx(probability[1] / probability[0], rel=1e-9)
    assert reason.startswith("thompson: P(best) a 0.08, b 0.92, c 0.00")
    weights, reason = thompson_weights_gaussian(
        [1.0, 2.0],
        [0.1, 0.1],
        [50, 400],
        live=[True, True],
        min_samples=100,
        names=["a", "b"],
    )
    assert weights.tolist() == [0.5, 0.5] and reason == "equal: a has 50 of 100 samples"


def _random_arms(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = int(rng.integers(1, 9))
    n = rng.integers(0, 50_000, size=k)
    conversions = rng.binomial(n, rng.uniform(0, 0.3, size=k))
    live = rng.uniform(size=k) < 0.8
    live[rng.integers(k)] = True
    return conversions, n, live


def test_top_two_weights_sum_to_one_and_respect_the_floor() -> None:
    rng = np.random.default_rng(13)
    for _ in range(60):
        conversions, n, live = _random_arms(rng)
        floor = float(rng.choice([0.0, 0.01, 0.05, 0.2]))
        beta = float(rng.choice([0.0, 0.25, 0.5, 0.9]))
        weights, reason = top_two_weights(
            conversions,
            n,
            live=live,
            min_samples=int(rng.integers(0, 2000)),
            beta=beta,
            floor=floor,
        )
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(weights[~live] == 0)
        assert np.all(weights[live] >= min(floor, 1 / live.sum()) - 1e-12)
        assert reason.startswith(("top-two thompson", "equal:", "single live arm"))


def test_top_two_with_beta_one_is_thompson() -> None:
    rng = np.random.default_rng(17)
    for _ in range(40):
        conversions, n, live = _random_arms(rng)
        options: dict[str, Any] = {
            "live": live,
            "min_samples": int(rng.integers(0, 2000)),
            "floor": float(rng.choice([0.0, 0.01, 0.1])),
        }
        weights, reason = top_two_weights(conversions, n, beta=1.0, **options)
        expected_weights, expected_reason = thompson_weights(conversions, n, **options)
        np.testing.assert_array_equal(weights, expected_weights)
        assert reason == expected_reason
        means = rng.normal(5.0, 1.0, size=n.size)
        variances = rng.uniform(0.0, 0.5, size=n.size)
        weights, reason = top_two_weights_gaussian(means, variances, n, beta=1.0, **options)
        expected_weights, expected_reason = thompson_weights_gaussian(
            means, variances, n, **options
        )
        np.testing.assert_array_equal(weights, expected_weights)
        assert reason == expected_reason


def test_top_two_symmetric_arms_share_equally() -> None:
    weights, _reason = top_two_weights([50] * 4, [500] * 4, live=[True] * 4, min_samples=1)
    np.testing.assert_allclose(weights, 0.25, atol=1e-12)
    # Two equal losers behind a clear leader: the leader keeps beta, the losers split the rest.
    weights, reason = top_two_weights(
        [1000, 1000, 1300], [10_000] * 3, live=[True] * 3, min_samples=1, names=["a", "b", "c"]
    )
    assert weights[0] == pytest.approx(weights[1], abs=1e-12)
    np.testing.assert_allclose(weights, [0.25, 0.25, 0.5], atol=1e-9)
    assert reason == (
        "top-two thompson (beta 0.5): P(best) a 0.00, b 0.00, c 1.00; "
        "runner-up a 0.50, b 0.50, c 0.00; floor 1%"
    )
    weights, _reason = top_two_weights_gaussian(
        [2.0, 2.0, 2.0], [0.1, 0.1, 0.1], [100] * 3, live=[True] * 3, min_samples=1
    )
    np.testing.assert_allclose(weights, 1 / 3, atol=1e-12)


def _runner_up_by_subsets(conversions: np.ndarray, n: np.ndarray) -> np.ndarray:
    """P(i runner-up) from the definition, one beta_binomial_best call per subset."""
    probability, _loss = beta_binomial_best(conversions, n)
    runner = np.zeros(n.size)
    for j in range(n.size):
        rest = np.delete(np.arange(n.size), j)
        runner[rest] += probability[j] * beta_binomial_best(conversions[rest], n[rest])[0]
    return runner


@pytest.mark.parametrize(
    ("conversions", "n", "beta"),
    [
        ([3, 5, 4], [40, 40, 40], 0.5),
        ([100, 110, 95, 120, 118], [1000] * 5, 0.3),
        ([0, 0, 1], [500, 500, 500], 0.5),
        ([1000, 1010, 1020, 990, 1005, 1000, 995, 1015, 1030, 980], [10_000] * 10, 0.7),
        ([120, 4, 3000, 17], [1000, 40, 30_000, 170], 0.5),
    ],
)
def test_top_two_weights_are_the_definition_on_subsets(
    conversions: list[int], n: list[int], beta: float
) -> None:
    # The shared-node quadrature against a separate integration of every subset.
    successes, trials = np.asarray(conversions, dtype=float), np.asarray(n, dtype=float)
    weights, _reason = top_two_weights(
        successes, trials, live=[True] * trials.size, min_samples=0, beta=beta, floor=0.0
    )
    probability, _loss = beta_binomial_best(successes, trials)
    expected = beta * probability + (1 - beta) * _runner_up_by_subsets(successes, trials)
    np.testing.assert_allclose(weights, expected, atol=1e-9)


def _top_two_monte_carlo(
    draw: Any, k: int, beta: float, rng: np.random.Generator, draws: int
) -> np.ndarray:
    """Frequencies of the top-two rule: the best of a posterior draw with probability beta,
    else the best of an independent re-draw among the arms other than that first best."""
    first = draw(draws).argmax(axis=1)
    second = draw(draws)
    second[np.arange(draws), first] = -np.inf
    chosen = np.where(rng.uniform(size=draws) < beta, first, second.argmax(axis=1))
    return np.bincount(chosen, minlength=k) / draws


@pytest.mark.parametrize(
    ("conversions", "n", "beta", "seed"),
    [
        ([3, 5, 4], [40, 40, 40], 0.5, 1),
        ([100, 110, 95, 120, 118], [1000] * 5, 0.3, 2),
        ([1000, 1000, 1200], [10_000] * 3, 0.5, 3),
        ([200, 180], [1000, 1000], 0.6, 4),
    ],
)
def test_top_two_weights_match_a_seeded_monte_carlo_of_the_rule(
    conversions: list[int], n: list[int], beta: float, seed: int
) -> None:
    draws = 400_000
    successes, trials = np.asarray(conversions), np.asarray(n)
    rng = np.random.default_rng(seed)
    frequency = _top_two_monte_carlo(
        lambda size: rng.beta(1 + successes, 1 + trials - successes, size=(size, trials.size)),
        trials.size,
        beta,
        rng,
        draws,
    )
    weights, _reason = top_two_weights(
        conversions, n, live=[True] * trials.size, min_samples=0, beta=beta, floor=0.0
    )
    se = np.sqrt(frequency * (1 - frequency) / draws)
    assert np.all(np.abs(weights - frequency) <= 5 * se + 1e-9)


def test_top_two_weights_gaussian_match_a_seeded_monte_carlo_of_the_rule() -> None:
    means = np.array([0.5, 0.52, 0.49, 0.55, 0.51])
    variances = np.array([0.001, 0.0004, 0.002, 0.003, 0.0001])
    draws = 400_000
    rng = np.random.default_rng(23)
    frequency = _top_two_monte_carlo(
        lambda size: rng.normal(means, np.sqrt(variances), size=(size, means.size)),
        means.size,
        0.5,
        rng,
        draws,
    )
    weights, reason = top_two_weights_gaussian(
        means, variances, [100] * 5, live=[True] * 5, min_samples=0, floor=0.0
    )
    se = np.sqrt(frequency * (1 - frequency) / draws)
    assert np.all(np.abs(weights - frequency) <= 5 * se + 1e-9)
    assert reason.startswith("top-two thompson (beta 0.5): P(best) arm 0 ")


def test_top_two_weights_two_arms_lone_arm_and_gates() -> None:
    # Two live arms: the runner-up is the other arm, so beta 0.5 splits evenly whatever the data.
    conversions, n = [100, 140], [1000, 1000]
    probability, _loss = beta_binomial_best(conversions, n)
    weights, _reason = top_two_weights(conversions, n, live=[True, True], min_samples=1)
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-12)
    weights, _reason = top_two_weights(
        conversions, n, live=[True, True], min_samples=1, beta=0.8, floor=0.0
    )
    np.testing.assert_allclose(weights, 0.8 * probability + 0.2 * probability[::-1], atol=1e-12)
    weights, reason = top_two_weights(
        [10, 50, 60], [100, 500, 500], live=[False, True, False], min_samples=10
    )
    assert weights.tolist() == [0.0, 1.0, 0.0] and "single live arm" in reason
    weights, reason = top_two_weights(
        [30, 10, 12], [300, 120, 300], live=[True] * 3, min_samples=300, names=["a", "b", "c"]
    )
    np.testing.assert_allclose(weights, 1 / 3)
    assert reason == "equal: b has 120 of 300 samples"
    # Point masses only: no integral; the runner-up is the best of the rest, ties split.
    weights, _reason = top_two_weights_gaussian(
        [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [10] * 3, live=[True] * 3, min_samples=1, floor=0.0
    )
    np.testing.assert_allclose(weights, [0.5, 0.5, 0.0], atol=1e-15)
    weights, _reason = top_two_weights_gaussian(
        [2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [10] * 3, live=[True] * 3, min_samples=1, floor=0.0
    )
    np.testing.assert_allclose(weights, [0.5, 0.5, 0.0], atol=1e-15)
    with pytest.raises(ValueError, match="beta"):
        top_two_weights([1, 2], [10, 10], live=[True, True], min_samples=1, beta=1.5)
    with pytest.raises(ValueError, match="live"):
        top_two_weights_gaussian([1.0], [0.1], [10], live=[False], min_samples=1)
