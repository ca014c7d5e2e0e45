"""Experiment statistics: P(best), expected loss, lift intervals, SRM and Thompson weights.

Pure numpy/scipy, no I/O and no Monte Carlo: every figure is deterministic for its inputs. scipy
is imported by the functions that need it, not with this module: ``import autoexec_dagster``
reaches this module, and scipy.stats alone takes a few hundred milliseconds to import.

- :func:`beta_binomial_best` and :func:`gaussian_best` give each arm's probability of being best
  and its expected loss (``E[max_j p_j - p_i]``) by one-dimensional numerical integration.
- :func:`difference_interval` and :func:`relative_lift_interval` are Welch intervals for the
  absolute and relative difference of a treatment against a control, computed as GrowthBook's
  gbstats ``TwoSidedTTest`` does.
- :func:`srm_p_value` is the chi-square sample ratio mismatch test against the weights in force
  in each period.
- :func:`thompson_weights` and :func:`thompson_weights_gaussian` are batched Thompson sampling
  weights for the next period, with a floor per live arm.
- :func:`top_two_weights` and :func:`top_two_weights_gaussian` are batched top-two Thompson
  sampling weights (best-arm identification), floored likewise.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# The integration: each arm's posterior, from its 1e-14 to its 1 - 1e-14 quantile, is cut into
# _PANELS_PER_ARM equal panels (a normal's panel is 0.64 sd wide); the panels of all arms are
# merged and each one is integrated with _GAUSS_NODES-point Gauss-Legendre. The integrands are
# smooth on every panel, so the error is far below 1e-8; the tails left out weigh 1e-14.
_PANELS_PER_ARM = 24
_GAUSS_NODES = 8
_TAIL = 1e-14
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(_GAUSS_NODES)
# A Beta density with a parameter below 1 is infinite at that end: geometric panels towards it
# keep every panel's integrand smooth.
_SINGULAR_PANELS = 40
# A zero-variance arm is integrated as a normal this narrow (relative to the data's scale): the
# panels then resolve its step, and two equal point masses tie exactly.
_POINT_MASS_SD = 1e-9

ArrayLike = Sequence[float] | Sequence[int] | np.ndarray


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval and p-value.

    Attributes:
        estimate: The estimate (a difference of means, or a relative lift).
        low: The interval's lower bound (NaN when the inputs cannot support an interval).
        high: The interval's upper bound (NaN likewise).
        p_value: The two-sided p-value of "no difference" (NaN likewise).
    """

    estimate: float
    low: float
    high: float
    p_value: float


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must hold at least one arm")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def _quadrature(breakpoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights over the panels between sorted unique breakpoints."""
    edges = np.unique(breakpoints)
    left, width = edges[:-1], np.diff(edges)
    keep = width > 0
    left, width = left[keep], width[keep]
    nodes = left[:, None] + width[:, None] * (_NODES[None, :] + 1.0) * 0.5
    weights = width[:, None] * _WEIGHTS[None, :] * 0.5
    return nodes.ravel(), weights.ravel()


def _exclusive_products(cdf: np.ndarray) -> np.ndarray:
    """Row i: the product over j != i of ``cdf[j]`` (prefix times suffix, no division by zero)."""
    k = cdf.shape[0]
    ones = np.ones((1, cdf.shape[1]))
    prefix = np.cumprod(np.vstack([ones, cdf[:-1]]), axis=0)
    suffix = np.cumprod(np.vstack([ones, cdf[:0:-1]]), axis=0)[::-1]
    return prefix[:k] * suffix[:k]


def _best(cdf: np.ndarray, pdf: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(best) and expected loss per arm from each arm's CDF and density at quadrature nodes.

    P(best)_i is the integral of f_i * prod_{j != i} F_j. The expected loss of arm i,
    E[max] - E[p_i], is the integral of (F_i - prod_j F_j): no cancellation between two large
    numbers, never negative, and exactly 0 for a lone arm. The nodes span every arm's posterior,
    and beyond them every F_i is 0 (below) or 1 (above), so both integrands vanish there.
    """
    probability = (pdf * _exclusive_products(cdf)) @ weights
    total = probability.sum()
    k = cdf.shape[0]
    probability = probability / total if total > 0 else np.full(k, 1.0 / k)
    loss = (cdf - np.prod(cdf, axis=0)[None, :]) @ weights
    return probability, np.maximum(loss, 0.0)


def _best_without(
    cdf: np.ndarray, pdf: np.ndarray, weights: np.ndarray, left_out: int
) -> np.ndarray:
    """P(best) among the arms other than ``left_out``, on the nodes of all the arms (0 for it).

    An arm left out is one whose CDF is 1 and density 0 everywhere: it beats no one and every
    other arm beats it. The nodes of the full set are a refinement of the subset's own (its
    panels plus the left-out arm's), so the integral is at least as accurate as on the subset's
    nodes, and the expensive part, the CDFs and densities, is computed once for every subset.
    """
    cdf_rest = cdf.copy()
    cdf_rest[left_out] = 1.0
    pdf_rest = pdf.copy()
    pdf_rest[left_out] = 0.0
    probability = (pdf_rest * _exclusive_products(cdf_rest)) @ weights
    total = probability.sum()
    if total > 0:
        return probability / total
    share = np.full(cdf.shape[0], 1.0 / (cdf.shape[0] - 1))
    share[left_out] = 0.0
    return share


def _runner_up(probability: np.ndarray, best_without: Callable[[int], np.ndarray]) -> np.ndarray:
    """P(i is the runner-up) = sum over j != i of P(j best) * P(i best among the arms but j).

    The terms with a leader of probability 0 are skipped: they add nothing, and an arm far
    behind is common (its subset would be integrated for no effect).
    """
    runner = np.zeros(probability.size)
    for j in np.flatnonzero(probability > 0):
        runner += probability[j] * best_without(int(j))
    return runner


def _beta_at_nodes(
    alpha: np.ndarray, beta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each Beta posterior's CDF and density at quadrature nodes spanning all of them.

    Nodes above 1/2 are placed by their distance to 1, which floating point resolves down to
    1e-300 where x itself stops at 1 - 1.1e-16: a density with beta < 1 is infinite at 1 and
    its mass there must be integrated. (1 - x is exact for x >= 1/2, so linear panels convert
    without loss.)
    """
    from scipy import special

    low = special.betaincinv(alpha, beta, _TAIL)
    from_one = special.betaincinv(beta, alpha, _TAIL)  # 1 - the upper quantile, to full precision
    lower = [np.array([0.5])]  # x coordinates in [0, 1/2]
    upper = [np.array([0.5])]  # 1 - x coordinates in [0, 1/2]
    for i in range(alpha.size):
        linear = np.linspace(low[i], 1.0 - from_one[i], _PANELS_PER_ARM + 1)
        lower.append(linear[linear <= 0.5])
        upper.append(1.0 - linear[linear > 0.5])
        if alpha[i] < 1:
            lower.append(np.geomspace(max(low[i], 1e-300), 0.5, _SINGULAR_PANELS))
            lower.append(np.zeros(1))
        if beta[i] < 1:
            upper.append(np.geomspace(max(from_one[i], 1e-300), 0.5, _SINGULAR_PANELS))
            upper.append(np.zeros(1))
    x_low, w_low = _quadrature(np.clip(np.concatenate(lower), 0.0, 0.5))
    y_up, w_up = _quadrature(np.clip(np.concatenate(upper), 0.0, 0.5))
    x = np.concatenate([x_low, 1.0 - y_up])
    y = np.concatenate([1.0 - x_low, y_up])
    a, b = alpha[:, None], beta[:, None]
    cdf = np.concatenate(
        [special.betainc(a, b, x_low[None, :]), special.betaincc(b, a, y_up[None, :])], axis=1
    )
    log_pdf = special.xlogy(a - 1.0, x) + special.xlogy(b - 1.0, y) - special.betaln(a, b)
    return cdf, np.exp(log_pdf), np.concatenate([w_low, w_up])


def beta_binomial_best(
    conversions: ArrayLike,
    n: ArrayLike,
    *,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each arm's probability of being best and expected loss under Beta-Binomial posteriors.

    Arm i's rate has the posterior Beta(prior_alpha + conversions_i, prior_beta + n_i -
    conversions_i). The figures come from numerical integration (Gauss-Legendre panels over
    every posterior, from its 1e-14 to its 1 - 1e-14 quantile), not from sampling, so they are
    the same on every call and agree with adaptive quadrature to 1e-6 or better from n = 0 to
    n = 10,000,000, with zero or all conversions. Three arms take about 1-3 ms, ten 15-70 ms.

    Args:
        conversions: Successes per arm (need not be integers: ``mean * n`` is accepted).
        n: Trials per arm.
        prior_alpha: The prior's alpha (1 with prior_beta 1 is the uniform prior).
        prior_beta: The prior's beta.

    Returns:
        ``(probability_best, expected_loss)``, one value per arm: the probabilities sum to 1;
        ``expected_loss[i]`` is ``E[max_j p_j - p_i]``, in the units of the rate. A lone arm has
        probability 1 and loss 0.

    Raises:
        ValueError: The arrays differ in length, are empty or not finite, a count is negative,
            conversions exceed n, or a prior parameter is not positive.
    """
    successes, trials = _counts(conversions, n, prior_alpha, prior_beta)
    if successes.size == 1:
        return np.ones(1), np.zeros(1)
    cdf, pdf, weights = _beta_at_nodes(prior_alpha + successes, prior_beta + trials - successes)
    return _best(cdf, pdf, weights)


def _counts(
    conversions: ArrayLike, n: ArrayLike, prior_alpha: float, prior_beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """The validated successes and trials of a Beta-Binomial model."""
    successes = _as_1d(conversions, "conversions")
    trials = _as_1d(n, "n")
    if successes.shape != trials.shape:
        raise ValueError(f"conversions and n differ in length ({successes.size} and {trials.size})")
    if np.any(successes < 0) or np.any(successes > trials):
        raise ValueError("conversions must lie between 0 and n for every arm")
    if not (prior_alpha > 0 and prior_beta > 0):
        raise ValueError(f"the prior must be positive, got ({prior_alpha}, {prior_beta})")
    return successes, trials


def gaussian_best(means: ArrayLike, variances_of_mean: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Each arm's probability of being best and expected loss under normal posteriors.

    Arm i's mean has the posterior N(means_i, variances_of_mean_i) (for a sample mean under a
    flat prior, the variance of one unit divided by n). Computed like
    :func:`beta_binomial_best`, by numerical integration. A zero variance is a point mass: it is
    best with certainty when its mean is the highest, and equal point masses tie.

    Args:
        means: The posterior mean per arm.
        variances_of_mean: The posterior variance per arm (not of one unit), >= 0.

    Returns:
        ``(probability_best, expected_loss)``, one value per arm, as for
        :func:`beta_binomial_best`, the loss in the units of the metric.

    Raises:
        ValueError: The arrays differ in length, are empty or not finite, or a variance is
            negative.
    """
    centre, variance = _normal_posteriors(means, variances_of_mean)
    if centre.size == 1:
        return np.ones(1), np.zeros(1)
    if not np.any(variance > 0):
        top = centre == centre.max()
        return top / top.sum(), centre.max() - centre
    return _best(*_normal_at_nodes(centre, variance))


def _normal_posteriors(
    means: ArrayLike, variances_of_mean: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """The validated means and variances of normal posteriors."""
    centre = _as_1d(means, "means")
    variance = _as_1d(variances_of_mean, "variances_of_mean")
    if centre.shape != variance.shape:
        raise ValueError(
            f"means and variances_of_mean differ in length ({centre.size} and {variance.size})"
        )
    if np.any(variance < 0):
        raise ValueError(f"variances_of_mean must be >= 0, got {variance.tolist()}")
    return centre, variance


def _normal_at_nodes(
    centre: np.ndarray, variance: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each normal posterior's CDF and density at quadrature nodes spanning all of them.

    At least one variance must be positive; a zero one is widened to a near point mass.
    """
    from scipy import special

    sd = np.sqrt(variance)
    scale = max(float(np.max(np.abs(centre))), float(np.max(sd)))
    floor = _POINT_MASS_SD * (scale if scale > 0 else 1.0)
    sd = np.maximum(sd, floor)
    reach = float(-special.ndtri(_TAIL)) * sd
    nodes, weights = _quadrature(
        np.linspace(centre - reach, centre + reach, _PANELS_PER_ARM + 1).ravel()
    )
    z = (nodes[None, :] - centre[:, None]) / sd[:, None]
    pdf = np.exp(-0.5 * z * z) / (sd[:, None] * math.sqrt(2.0 * math.pi))
    return special.ndtr(z), pdf, weights


def _nan_interval(estimate: float) -> Interval:
    return Interval(estimate=estimate, low=math.nan, high=math.nan, p_value=math.nan)


def _welch_df(var_t: float, n_t: float, var_c: float, n_c: float) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of two means."""
    a, b = var_t / n_t, var_c / n_c
    return (a + b) ** 2 / (a * a / (n_t - 1) + b * b / (n_c - 1))


def _t_interval(estimate: float, variance: float, df: float, confidence: float) -> Interval:
    if not (variance > 0 and math.isfinite(variance) and df > 0 and math.isfinite(estimate)):
        return _nan_interval(estimate)
    from scipy import stats as scipy_stats

    se = math.sqrt(variance)
    width = float(scipy_stats.t.ppf(0.5 + confidence / 2, df)) * se
    p_value = 2.0 * float(scipy_stats.t.sf(abs(estimate) / se, df))
    return Interval(estimate=estimate, low=estimate - width, high=estimate + width, p_value=p_value)


def _usable(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def difference_interval(
    mean_t: float,
    var_t: float,
    n_t: float,
    mean_c: float,
    var_c: float,
    n_c: float,
    *,
    confidence: float = 0.95,
) -> Interval:
    """Welch interval for the difference of means, treatment minus control.

    The variance of the difference is ``var_t / n_t + var_c / n_c``; the quantile is Student's t
    with the Welch-Satterthwaite degrees of freedom (gbstats ``TwoSidedTTest`` with
    ``difference_type="absolute"``).

    Args:
        mean_t: The treatment's mean.
        var_t: The sample variance of one treatment unit (for a 0/1 metric, gbstats uses
            ``p * (1 - p)`` without the ``n / (n - 1)`` correction; either works).
        n_t: The treatment's sample size.
        mean_c: The control's mean.
        var_c: The sample variance of one control unit.
        n_c: The control's sample size.
        confidence: The two-sided coverage of the interval.

    Returns:
        The difference with its interval and two-sided p-value. With fewer than 2 units in an
        arm, a negative or non-finite input, or a zero variance in both arms, the bounds and
        p-value are NaN (the estimate is kept when it is defined).

    Raises:
        ValueError: ``confidence`` is not strictly between 0 and 1.
    """
    _check_confidence(confidence)
    estimate = mean_t - mean_c if _usable(mean_t, mean_c) else math.nan
    if not _usable(var_t, n_t, var_c, n_c) or n_t < 2 or n_c < 2 or var_t < 0 or var_c < 0:
        return _nan_interval(estimate)
    variance = var_t / n_t + var_c / n_c
    if variance <= 0:
        return _nan_interval(estimate)
    return _t_interval(estimate, variance, _welch_df(var_t, n_t, var_c, n_c), confidence)


def relative_lift_interval(
    mean_t: float,
    var_t: float,
    n_t: float,
    mean_c: float,
    var_c: float,
    n_c: float,
    *,
    confidence: float = 0.95,
) -> Interval:
    """Delta-method interval for the relative lift of treatment over control.

    The estimate is ``(mean_t - mean_c) / |mean_c|`` (``mean_t / mean_c - 1`` for a positive
    control mean; the absolute value keeps "up is up" for a negative one, as gbstats does). Its
    variance is the delta method's ``var_t / (n_t mean_c^2) + var_c mean_t^2 / (n_c mean_c^4)``
    and the quantile is Student's t with the Welch-Satterthwaite degrees of freedom of the
    absolute difference: gbstats' frequentist ``TwoSidedTTest`` (``difference_type="relative"``)
    computes its ``expected``, ``ci`` and ``pValue`` this way.

    Args:
        mean_t: The treatment's mean.
        var_t: The sample variance of one treatment unit.
        n_t: The treatment's sample size.
        mean_c: The control's mean.
        var_c: The sample variance of one control unit.
        n_c: The control's sample size.
        confidence: The two-sided coverage of the interval.

    Returns:
        The relative lift (0.1 is +10%) with its interval and two-sided p-value. A zero control
        mean gives a NaN estimate; fewer than 2 units, negative or non-finite inputs, or zero
        variance in both arms give NaN bounds and p-value.

    Raises:
        ValueError: ``confidence`` is not strictly between 0 and 1.
    """
    _check_confidence(confidence)
    if not _usable(mean_t, mean_c) or mean_c == 0:
        return _nan_interval(math.nan)
    estimate = (mean_t - mean_c) / abs(mean_c)
    if not _usable(var_t, n_t, var_c, n_c) or n_t < 2 or n_c < 2 or var_t < 0 or var_c < 0:
        return _nan_interval(estimate)
    if var_t / n_t + var_c / n_c <= 0:
        return _nan_interval(estimate)
    variance = var_t / (n_t * mean_c**2) + var_c * mean_t**2 / (n_c * mean_c**4)
    return _t_interval(estimate, variance, _welch_df(var_t, n_t, var_c, n_c), confidence)


def srm_p_value(observed: ArrayLike | Sequence[Sequence[float]], expected_share: Any) -> float:
    """Chi-square p-value of a sample ratio mismatch against the weights in force per period.

    Each row is a period (a day, say) with its own design weights; the counts are the entities
    newly assigned in that period. Since each period's total is fixed by the traffic that
    arrived, only its split is tested: expected counts are the row total times the row's
    weights, the statistic sums over the cells with a positive weight, and the degrees of freedom
    are the sum over periods with traffic of (arms with a positive weight - 1). For one period
    this is the plain goodness-of-fit test (``scipy.stats.chisquare``; gbstats ``check_srm``).

    Args:
        observed: Counts, shape ``(periods, arms)`` or ``(arms,)`` for a single period.
        expected_share: The design weights, the same shape; each row is normalised to sum to 1.

    Returns:
        The p-value; small means the observed split is unlikely under the design. 1.0 when
        there is nothing to test (no traffic, or one live arm per period). 0.0 when an arm
        received entities in a period where its weight was 0, which the design cannot produce.

    Raises:
        ValueError: The shapes differ or are not 1-D/2-D, a count or weight is negative or not
            finite, or a period with traffic has no positive weight.
    """
    counts = np.asarray(observed, dtype=np.float64)
    weights = np.asarray(expected_share, dtype=np.float64)
    if counts.ndim == 1:
        counts = counts[None, :]
    if weights.ndim == 1:
        weights = weights[None, :]
    if counts.ndim != 2 or counts.shape != weights.shape:
        raise ValueError(
            f"observed and expected_share must have the same 1-D or 2-D shape, got "
            f"{np.shape(observed)} and {np.shape(expected_share)}"
        )
    if not (np.all(np.isfinite(counts)) and np.all(np.isfinite(weights))):
        raise ValueError("observed and expected_share must be finite")
    if np.any(counts < 0) or np.any(weights < 0):
        raise ValueError("observed and expected_share must be >= 0")
    totals = counts.sum(axis=1)
    weight_totals = weights.sum(axis=1)
    with_traffic = totals > 0
    if np.any(with_traffic & (weight_totals <= 0)):
        raise ValueError("a period with traffic has no arm with a positive weight")
    live = (weights > 0) & with_traffic[:, None]
    if np.any((counts > 0) & ~(weights > 0)):
        return 0.0
    dof = int(np.sum(np.maximum(live.sum(axis=1) - 1, 0)))
    if dof == 0:
        return 1.0
    safe_totals = np.where(weight_totals > 0, weight_totals, 1.0)
    expected = totals[:, None] * weights / safe_totals[:, None]
    safe_expected = np.where(live, expected, 1.0)
    statistic = float(np.sum(np.where(live, (counts - expected) ** 2 / safe_expected, 0.0)))
    from scipy import stats as scipy_stats

    return float(scipy_stats.chi2.sf(statistic, dof))


def _floored(probability: np.ndarray, floor: float) -> np.ndarray:
    """Weights proportional to ``probability`` with every entry at least ``floor``, summing to 1.

    Water-filling: arms below the floor are raised to it and the rest share what is left in
    proportion to their probabilities, repeated until no arm falls below. This keeps the ratios
    among the arms above the floor, which mixing in a uniform share would not.
    """
    k = probability.size
    if floor * k >= 1.0:
        return np.full(k, 1.0 / k)
    pinned = np.zeros(k, dtype=bool)
    weights = probability.copy()
    for _ in range(k):
        free_mass = 1.0 - floor * pinned.sum()
        free_total = probability[~pinned].sum()
        if free_total > 0:
            scaled = np.where(pinned, floor, probability * free_mass / free_total)
        else:
            scaled = np.where(pinned, floor, free_mass / max(int((~pinned).sum()), 1))
        below = (~pinned) & (scaled < floor)
        weights = scaled
        if not below.any():
            break
        pinned |= below
    return weights


def _live_mask(live: Sequence[bool] | np.ndarray, k: int) -> np.ndarray:
    mask = np.asarray(live, dtype=bool)
    if mask.shape != (k,):
        raise ValueError(f"live must hold one flag per arm ({k}), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("at least one arm must be live")
    return mask


def _arm_names(names: Sequence[str] | None, k: int) -> list[str]:
    if names is None:
        return [f"arm {i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"names must hold one name per arm ({k}), got {len(names)}")
    return list(names)


def _allocate(
    share_of_live: Callable[[list[str]], tuple[np.ndarray, str]],
    counts: np.ndarray,
    mask: np.ndarray,
    *,
    min_samples: int,
    floor: float,
    names: list[str],
) -> tuple[np.ndarray, str]:
    """Shared tail of the Thompson allocations: equal until min_samples, then the floored share.

    ``share_of_live`` is called with the live arms' names only when the share is needed (two or
    more live arms, all with min_samples) and returns it with the reason's text before the floor.
    """
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must lie between 0 and 1, got {floor}")
    weights = np.zeros(counts.size)
    live_index = np.flatnonzero(mask)
    short = [i for i in live_index if counts[i] < min_samples]
    if short:
        weights[live_index] = 1.0 / live_index.size
        fewest = min(short, key=lambda i: counts[i])
        others = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
        return weights, (
            f"equal: {names[fewest]} has {counts[fewest]:,.0f} of {min_samples:,} samples{others}"
        )
    if live_index.size == 1:
        weights[live_index] = 1.0
        return weights, f"single live arm: {names[live_index[0]]} takes all traffic"
    share, text = share_of_live([names[i] for i in live_index])
    weights[live_index] = _floored(np.asarray(share, dtype=np.float64), floor)
    return weights, f"{text}; floor {floor:.0%}"


def _shown(names: list[str], values: np.ndarray) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in zip(names, values, strict=True))


def _thompson_share(
    probability_of_live: Callable[[], np.ndarray],
) -> Callable[[list[str]], tuple[np.ndarray, str]]:
    def share(live_names: list[str]) -> tuple[np.ndarray, str]:
        probability = probability_of_live()
        return probability, f"thompson: P(best) {_shown(live_names, probability)}"

    return share


def _top_two_share(
    best_and_runner_up: Callable[[], tuple[np.ndarray, np.ndarray | None]], beta: float
) -> Callable[[list[str]], tuple[np.ndarray, str]]:
    def share(live_names: list[str]) -> tuple[np.ndarray, str]:
        probability, runner = best_and_runner_up()
        if runner is None:  # beta == 1: plain Thompson, to the bit and in the words
            return probability, f"thompson: P(best) {_shown(live_names, probability)}"
        return beta * probability + (1.0 - beta) * runner, (
            f"top-two thompson (beta {beta:g}): P(best) {_shown(live_names, probability)}; "
            f"runner-up {_shown(live_names, runner)}"
        )

    return share


def _check_beta(beta: float) -> None:
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must lie between 0 and 1, got {beta}")


def thompson_weights(
    conversions: ArrayLike,
    n: ArrayLike,
    *,
    live: Sequence[bool] | np.ndarray,
    min_samples: int,
    floor: float = 0.01,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """Batched Thompson sampling weights for the next period, for a 0/1 metric.

    The weight of a live arm is its Beta-Binomial probability of being best among the live arms
    (the share of traffic Thompson sampling would send it over many draws, computed exactly),
    with every live arm raised to at least ``floor`` and the rest renormalised so the weights sum
    to 1 and the floor still holds. Until every live arm has ``min_samples`` trials the live arms
    share equally, so an early lucky streak does not starve an arm. Arms that are not live get 0.
    For a numeric metric see :func:`thompson_weights_gaussian`.

    Args:
        conversions: Successes per arm, over all periods so far.
        n: Trials per arm, over all periods so far.
        live: One flag per arm; only live arms receive traffic.
        min_samples: Trials every live arm needs before the weights follow P(best).
        floor: The minimum weight of a live arm (capped at 1 / live arms).
        prior_alpha: The Beta prior's alpha.
        prior_beta: The Beta prior's beta.
        names: Arm names for the reason (``"arm 0"``, ``"arm 1"``, ... when left out).

    Returns:
        ``(weights, reason)``: the weights per arm (summing to 1) and one line saying why, such
        as ``"equal: b has 120 of 300 samples"`` or
        ``"thompson: P(best) a 0.81, b 0.12, c 0.07; floor 1%"``.

    Raises:
        ValueError: The inputs are inconsistent (see :func:`beta_binomial_best`), no arm is live,
            or ``floor`` is outside [0, 1].
    """
    successes = _as_1d(conversions, "conversions")
    trials = _as_1d(n, "n")
    mask = _live_mask(live, trials.size)
    labels = _arm_names(names, trials.size)
    if successes.shape != trials.shape:
        raise ValueError(f"conversions and n differ in length ({successes.size} and {trials.size})")
    return _allocate(
        _thompson_share(
            lambda: beta_binomial_best(
                successes[mask], trials[mask], prior_alpha=prior_alpha, prior_beta=prior_beta
            )[0]
        ),
        trials,
        mask,
        min_samples=min_samples,
        floor=floor,
        names=labels,
    )


def thompson_weights_gaussian(
    means: ArrayLike,
    variances_of_mean: ArrayLike,
    n: ArrayLike,
    *,
    live: Sequence[bool] | np.ndarray,
    min_samples: int,
    floor: float = 0.01,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """Batched Thompson sampling weights for a numeric metric, from normal posteriors.

    As :func:`thompson_weights`, with each arm's probability of being best from
    :func:`gaussian_best` (a flat prior: the posterior of arm i is N(mean_i, variance_i / n_i)).

    Args:
        means: The sample mean per arm.
        variances_of_mean: The variance of each arm's mean (the variance of one unit / n).
        n: The sample size per arm (for the ``min_samples`` gate).
        live: One flag per arm; only live arms receive traffic.
        min_samples: Units every live arm needs before the weights follow P(best).
        floor: The minimum weight of a live arm (capped at 1 / live arms).
        names: Arm names for the reason.

    Returns:
        ``(weights, reason)`` as for :func:`thompson_weights`.

    Raises:
        ValueError: The inputs are inconsistent (see :func:`gaussian_best`), no arm is live, or
            ``floor`` is outside [0, 1].
    """
    centre = _as_1d(means, "means")
    variance = _as_1d(variances_of_mean, "variances_of_mean")
    counts = _as_1d(n, "n")
    if not centre.shape == variance.shape == counts.shape:
        raise ValueError("means, variances_of_mean and n must have one value per arm each")
    mask = _live_mask(live, counts.size)
    return _allocate(
        _thompson_share(lambda: gaussian_best(centre[mask], variance[mask])[0]),
        counts,
        mask,
        min_samples=min_samples,
        floor=floor,
        names=_arm_names(names, counts.size),
    )


def _beta_top_two(
    successes: np.ndarray, trials: np.ndarray, prior_alpha: float, prior_beta: float, beta: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """P(best) and P(runner-up) of Beta posteriors; no runner-up at beta 1 (it has no weight)."""
    if beta == 1:
        probability = beta_binomial_best(
            successes, trials, prior_alpha=prior_alpha, prior_beta=prior_beta
        )[0]
        return probability, None
    cdf, pdf, weights = _beta_at_nodes(prior_alpha + successes, prior_beta + trials - successes)
    probability, _loss = _best(cdf, pdf, weights)
    return probability, _runner_up(probability, lambda j: _best_without(cdf, pdf, weights, j))


def _normal_top_two(
    centre: np.ndarray, variance: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """P(best) and P(runner-up) of normal posteriors; no runner-up at beta 1."""
    if beta == 1:
        return gaussian_best(centre, variance)[0], None
    if not np.any(variance > 0):
        # Point masses only: no integral, each subset's ties are counted directly.
        def without(j: int) -> np.ndarray:
            rest = gaussian_best(np.delete(centre, j), np.delete(variance, j))[0]
            return np.insert(rest, j, 0.0)

        probability = gaussian_best(centre, variance)[0]
        return probability, _runner_up(probability, without)
    cdf, pdf, weights = _normal_at_nodes(centre, variance)
    probability, _loss = _best(cdf, pdf, weights)
    return probability, _runner_up(probability, lambda j: _best_without(cdf, pdf, weights, j))


def top_two_weights(
    conversions: ArrayLike,
    n: ArrayLike,
    *,
    live: Sequence[bool] | np.ndarray,
    min_samples: int,
    beta: float = 0.5,
    floor: float = 0.01,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """Batched top-two Thompson sampling weights for the next period, for a 0/1 metric.

    Plain Thompson sampling minimises regret: it sends nearly all traffic to the leader, which
    starves the arms the leader must be shown to beat. Top-two sampling (Russo 2016, "Simple
    Bayesian algorithms for best-arm identification") is built to identify the best arm: a
    share ``beta`` goes as Thompson would and the rest to a challenger, the best of an
    independent posterior draw among the arms other than the leader. Computed exactly by
    quadrature on the live arms' Beta-Binomial posteriors, not by sampling::

        weight_i = beta * P(i best) + (1 - beta) * P(i runner-up)
        P(i runner-up) = sum over j != i of P(j best) * P(i best among the arms other than j)

    (Russo's TTTS re-draws until the draw's best differs from the leader, which gives
    ``P(i best) / (1 - P(j best))`` in place of the inner term; the two agree for two arms and
    both leave about ``1 - beta`` of the traffic to the arms other than a clear leader.) With two
    live arms the runner-up is the other arm, so beta 0.5 splits them evenly. The floor, the
    equal split until every live arm has ``min_samples`` trials, and the zero weight of arms
    that are not live are those of :func:`thompson_weights`; ``beta=1`` is
    :func:`thompson_weights`, weights and reason alike. Costs about one :func:`beta_binomial_best`
    call: the posteriors are evaluated once and every subset reuses them.

    Args:
        conversions: Successes per arm, over all periods so far.
        n: Trials per arm, over all periods so far.
        live: One flag per arm; only live arms receive traffic.
        min_samples: Trials every live arm needs before the weights follow the posteriors.
        beta: The share that follows P(best), in [0, 1]; 0.5 is Russo's default.
        floor: The minimum weight of a live arm (capped at 1 / live arms).
        prior_alpha: The Beta prior's alpha.
        prior_beta: The Beta prior's beta.
        names: Arm names for the reason (``"arm 0"``, ``"arm 1"``, ... when left out).

    Returns:
        ``(weights, reason)``: the weights per arm (summing to 1) and one line saying why, such
        as ``"top-two thompson (beta 0.5): P(best) a 0.01, b 0.02, c 0.97; runner-up a 0.49,
        b 0.48, c 0.03; floor 1%"`` (the equal and single-arm reasons are those of
        :func:`thompson_weights`).

    Raises:
        ValueError: The inputs are inconsistent (see :func:`beta_binomial_best`), no arm is live,
            or ``beta`` or ``floor`` is outside [0, 1].
    """
    _check_beta(beta)
    successes = _as_1d(conversions, "conversions")
    trials = _as_1d(n, "n")
    mask = _live_mask(live, trials.size)
    labels = _arm_names(names, trials.size)
    successes, trials = _counts(successes, trials, prior_alpha, prior_beta)
    return _allocate(
        _top_two_share(
            lambda: _beta_top_two(successes[mask], trials[mask], prior_alpha, prior_beta, beta),
            beta,
        ),
        trials,
        mask,
        min_samples=min_samples,
        floor=floor,
        names=labels,
    )


def top_two_weights_gaussian(
    means: ArrayLike,
    variances_of_mean: ArrayLike,
    n: ArrayLike,
    *,
    live: Sequence[bool] | np.ndarray,
    min_samples: int,
    beta: float = 0.5,
    floor: float = 0.01,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """Batched top-two Thompson sampling weights for a numeric metric, from normal posteriors.

    As :func:`top_two_weights`, with the probabilities from normal posteriors
    N(mean_i, variance_i) as in :func:`gaussian_best`; ``beta=1`` is
    :func:`thompson_weights_gaussian`.

    Args:
        means: The sample mean per arm.
        variances_of_mean: The variance of each arm's mean (the variance of one unit / n).
        n: The sample size per arm (for the ``min_samples`` gate).
        live: One flag per arm; only live arms receive traffic.
        min_samples: Units every live arm needs before the weights follow the posteriors.
        beta: The share that follows P(best), in [0, 1].
        floor: The minimum weight of a live arm (capped at 1 / live arms).
        names: Arm names for the reason.

    Returns:
        ``(weights, reason)`` as for :func:`top_two_weights`.

    Raises:
        ValueError: The inputs are inconsistent (see :func:`gaussian_best`), no arm is live, or
            ``beta`` or ``floor`` is outside [0, 1].
    """
    _check_beta(beta)
    centre, variance = _normal_posteriors(means, variances_of_mean)
    counts = _as_1d(n, "n")
    if not centre.shape == counts.shape:
        raise ValueError("means, variances_of_mean and n must have one value per arm each")
    mask = _live_mask(live, counts.size)
    return _allocate(
        _top_two_share(lambda: _normal_top_two(centre[mask], variance[mask], beta), beta),
        counts,
        mask,
        min_samples=min_samples,
        floor=floor,
        names=_arm_names(names, counts.size),
    )
