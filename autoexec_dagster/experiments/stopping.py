"""The stopping rule of an experiment: when to promote a variant, honest under daily looks.

A posterior threshold alone is not a stopping rule: checking "P(best) >= 0.95" every day
promotes a false winner in 25-35% of A/A tests (DESIGN.md, "Outcomes and experiments"). So the
rule here asks for a minimum run time and sample per arm, the posterior thresholds (P(best) and
expected loss of the leader), and an always-valid test that the leader beats every other live
arm: the normal-mixture sequential test (mixture SPRT) of Johari et al., "Always valid
inference" (Optimizely's stats engine; gbstats' ``SequentialTwoSidedTTest`` is the same
boundary). Its confidence sequence covers the true difference at every look at once, so looking
every day cannot inflate its error rate beyond ``1 - confidence`` (asymptotically: the variance
is estimated from the data).

The price is sample: the test needs data on the arms it compares against. An allocation that
starves the losers (Thompson weights with a 1% floor) leaves them too few units to show a +20%
winner beats them within a month of 1,000 entities a day; an equal split does (see
bench/RESULTS.md, "Experiments: statistical honesty").
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from autoexec_dagster.experiments.statistics import beta_binomial_best, gaussian_best

# The mixing distribution of the sequential test is N(0, tau^2) over the true difference, tau a
# share of the pooled mean: the test is most powerful for differences near tau, and its boundary
# is tightest near n* = 7.94 s^2 / tau^2 units in a pair (gbstats' "tuning parameter"; s^2 the
# per-unit variance of the difference, 4 p (1 - p) for an even split of a rate p). 20% of the
# mean puts n* near 7,000 units at a 10% rate, where a +20% lift is about 3 standard errors.
# Chosen on the bench's tuning seeds (1000-1049, bench/RESULTS.md): best or tied for best both
# with an equal split (0.15-0.5 alike) and with Thompson weights (0.2-0.3); 0.05 worst in both.
RELATIVE_MIXING_SD = 0.2


@dataclass(frozen=True)
class ArmSummary:
    """What the stopping rule needs to know of one arm, over all periods so far.

    Attributes:
        name: The arm's name (a variant, or the control).
        n: Units assigned to the arm with an outcome.
        mean: The mean outcome per unit (the conversion rate for a 0/1 metric).
        variance: The variance of one unit's outcome (for a 0/1 metric ``mean * (1 - mean)``).
    """

    name: str
    n: int
    mean: float
    variance: float


@dataclass(frozen=True)
class StopDecision:
    """The stopping rule's verdict after one look.

    Attributes:
        promote: The arm to promote, or None to keep running.
        reason: One line for people: the criteria that failed (or, when promoting, all of them)
            with their figures.
        probability_best: P(best) per live arm.
        expected_loss: Expected loss per live arm, in the metric's units.
    """

    promote: str | None
    reason: str
    probability_best: dict[str, float] = field(default_factory=dict)
    expected_loss: dict[str, float] = field(default_factory=dict)


def always_valid_interval(
    estimate: float, variance: float, *, tau2: float, alpha: float
) -> tuple[float, float]:
    """The normal-mixture confidence sequence for a difference of means at one look.

    With the estimate's variance V, the mixture likelihood ratio of "difference 0" against a
    N(0, tau2) mixture over alternatives exceeds 1 / alpha exactly when |estimate| exceeds
    ``sqrt(2 V (V + tau2) / tau2 * log(sqrt((V + tau2) / V) / alpha))``; the interval is the
    estimate plus or minus that radius. By Ville's inequality the intervals of all looks, at
    any data-dependent times, cover the true difference together with probability >= 1 - alpha
    (asymptotically, with V estimated from the data).

    Args:
        estimate: The estimated difference.
        variance: The variance of the estimate (``var_a / n_a + var_b / n_b``), > 0.
        tau2: The mixing variance, > 0: the test is most powerful for differences near
            ``sqrt(tau2)``.
        alpha: The error rate over all looks, in (0, 1).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when the variance is not positive and finite or the
        estimate is not finite.

    Raises:
        ValueError: ``tau2`` is not positive or ``alpha`` is not in (0, 1).
    """
    if not (tau2 > 0 and math.isfinite(tau2)):
        raise ValueError(f"tau2 must be positive and finite, got {tau2}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if not (variance > 0 and math.isfinite(variance) and math.isfinite(estimate)):
        return math.nan, math.nan
    ratio = (variance + tau2) / variance
    radius = math.sqrt(
        2.0 * variance * (variance + tau2) / tau2 * (0.5 * math.log(ratio) - math.log(alpha))
    )
    return estimate - radius, estimate + radius


def _validate(
    arms: Sequence[ArmSummary], control: str, live: Sequence[str]
) -> dict[str, ArmSummary]:
    by_name: dict[str, ArmSummary] = {}
    for arm in arms:
        if arm.name in by_name:
            raise ValueError(f"arm {arm.name!r} appears twice")
        if not (arm.n >= 0 and math.isfinite(arm.mean) and arm.variance >= 0):
            raise ValueError(
                f"arm {arm.name!r} needs n >= 0, a finite mean and a variance >= 0, got {arm}"
            )
        by_name[arm.name] = arm
    if control not in by_name:
        raise ValueError(f"the control {control!r} is not one of the arms {sorted(by_name)}")
    unknown = [name for name in live if name not in by_name]
    if unknown:
        raise ValueError(f"live arms {unknown} are not among the arms {sorted(by_name)}")
    if not live:
        raise ValueError("at least one arm must be live")
    if len(set(live)) != len(live):
        raise ValueError(f"live names an arm twice: {list(live)}")
    return by_name


def _posteriors(arms: list[ArmSummary], binary: bool) -> tuple[dict[str, float], dict[str, float]]:
    names = [arm.name for arm in arms]
    if binary:
        n = np.array([float(arm.n) for arm in arms])
        conversions = np.clip(np.array([arm.mean for arm in arms]) * n, 0.0, n)
        probability, loss = beta_binomial_best(conversions, n)
    elif all(arm.n >= 2 for arm in arms):
        probability, loss = gaussian_best(
            [arm.mean for arm in arms], [arm.variance / arm.n for arm in arms]
        )
    else:
        # A sample mean of fewer than 2 units has no variance to build a posterior from.
        return dict.fromkeys(names, math.nan), dict.fromkeys(names, math.nan)
    return (
        dict(zip(names, probability.tolist(), strict=True)),
        dict(zip(names, loss.tolist(), strict=True)),
    )


def _mixing_variance(arms: list[ArmSummary]) -> float:
    """tau^2: RELATIVE_MIXING_SD of the pooled mean, or of the pooled sd when the mean is 0."""
    total = sum(arm.n for arm in arms)
    if total <= 0:
        return 1.0
    pooled_mean = sum(arm.n * arm.mean for arm in arms) / total
    scale = abs(pooled_mean)
    if scale == 0:
        scale = math.sqrt(sum(arm.n * arm.variance for arm in arms) / total)
    return (RELATIVE_MIXING_SD * scale) ** 2 if scale > 0 else 1.0


def _figure(value: float) -> str:
    return f"{value:.4g}"


def stopping_decision(
    arms: Sequence[ArmSummary],
    *,
    control: str,
    live: Sequence[str],
    days_elapsed: float,
    min_days: float,
    min_samples: int,
    probability_best: float,
    expected_loss: float,
    binary: bool,
    confidence: float = 0.95,
    tau2: float | None = None,
) -> StopDecision:
    """Decide whether to promote a variant after one look at the data.

    The candidate is the live arm with the highest P(best) (ties go to the control). It is
    promoted only when all of these hold:

    1. ``days_elapsed >= min_days`` (weekly cycles and novelty effects need time);
    2. every live arm has ``n >= min_samples``;
    3. its P(best) among the live arms is ``>= probability_best``;
    4. its expected loss is ``<= expected_loss`` (in the metric's units);
    5. the always-valid test shows it beats every other live arm: the lower bound of
       :func:`always_valid_interval` for its difference with each is above 0, at
       ``alpha = (1 - confidence) / (live arms - 1)`` (Bonferroni; a false promotion needs the
       candidate's interval against one fixed other arm to err on the upper side, and the K
       such one-sided events have total probability at most ``K alpha / 2 <= 1 - confidence``).

    The posteriors are Beta-Binomial with a uniform prior for a 0/1 metric (``binary=True``;
    conversions are ``mean * n``) and normal with a flat prior otherwise (the mean with variance
    ``variance / n``). Criterion 5 is what keeps the rule honest under daily looks.

    Args:
        arms: Every arm's summary, live or not.
        control: The control arm's name (lifts in the reason are against it).
        live: The arms still receiving traffic; only they are compared.
        days_elapsed: Days since the experiment started.
        min_days: The minimum run time in days.
        min_samples: The minimum units per live arm.
        probability_best: The P(best) the candidate needs, e.g. 0.95.
        expected_loss: The largest expected loss the candidate may have, e.g. 0.002 on a 10%
            conversion rate (a fifth of a point of conversion risked by promoting it).
        binary: Whether the metric is 0/1.
        confidence: The confidence of the always-valid test over all looks.
        tau2: The sequential test's mixing variance; by default ``(0.2 * |pooled mean|)^2``
            (see :data:`RELATIVE_MIXING_SD`), or of the pooled sd when the mean is 0.

    Returns:
        The decision, with the reason and P(best) and expected loss per live arm.

    Raises:
        ValueError: An arm's figures are invalid, names repeat, the control or a live arm is
            unknown, no arm is live, or a threshold is out of range.
    """
    by_name = _validate(arms, control, live)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if not 0 <= probability_best <= 1:
        raise ValueError(f"probability_best must lie in [0, 1], got {probability_best}")
    if not expected_loss >= 0:
        raise ValueError(f"expected_loss must be >= 0, got {expected_loss}")
    live_arms = [by_name[name] for name in live]
    p_best, loss = _posteriors(live_arms, binary)
    if len(live_arms) == 1:
        candidate = live_arms[0]
    else:
        candidate = max(
            live_arms,
            key=lambda arm: (
                p_best[arm.name] if math.isfinite(p_best[arm.name]) else -1.0,
                arm.name == control,
            ),
        )
    name = candidate.name
    failed: list[str] = []
    passed: list[str] = []

    # Tenths, rounded down: "ran 4.7 days", and never "ran 3 of 3 days" at 2.96.
    days_shown = math.floor(days_elapsed * 10) / 10
    if days_elapsed >= min_days:
        passed.append(f"ran {days_shown:g} days (min {min_days:g})")
    else:
        failed.append(f"ran {days_shown:g} of {min_days:g} days")

    fewest = min(live_arms, key=lambda arm: arm.n)
    if fewest.n >= min_samples:
        passed.append(f"every live arm has >= {min_samples:,} samples (fewest {fewest.n:,})")
    else:
        failed.append(f"{fewest.name} has {fewest.n:,} of {min_samples:,} samples")

    candidate_p, candidate_loss = p_best[name], loss[name]
    if not math.isfinite(candidate_p):
        failed.append("P(best) undefined: an arm has fewer than 2 units")
    else:
        text = f"P(best) of {name} {candidate_p:.3f}"
        if candidate_p >= probability_best:
            passed.append(f"{text} >= {probability_best:g}")
        else:
            failed.append(f"{text} < {probability_best:g}")
        text = f"expected loss of {name} {_figure(candidate_loss)}"
        if candidate_loss <= expected_loss:
            passed.append(f"{text} <= {_figure(expected_loss)}")
        else:
            failed.append(f"{text} > {_figure(expected_loss)}")

    others = [arm for arm in live_arms if arm.name != name]
    if others:
        mixing = tau2 if tau2 is not None else _mixing_variance(live_arms)
        alpha = (1.0 - confidence) / len(others)
        beaten: list[str] = []
        unbeaten: list[str] = []
        for other in others:
            difference = candidate.mean - other.mean
            variance = (
                candidate.variance / candidate.n + other.variance / other.n
                if candidate.n > 0 and other.n > 0
                else math.nan
            )
            low, _high = always_valid_interval(difference, variance, tau2=mixing, alpha=alpha)
            bound = (
                f"lower bound {low:+.4g}"
                if math.isfinite(low)
                else "no spread in the outcomes yet to bound it"
            )
            shown = f"{other.name} (difference {difference:+.4g}, {bound})"
            (beaten if low > 0 else unbeaten).append(shown)
        label = f"always-valid {confidence * 100:g}% test"
        if unbeaten:
            failed.append(f"{label} does not show {name} beats {', '.join(unbeaten)}")
        else:
            passed.append(f"{label}: {name} beats {', '.join(beaten)}")
    else:
        passed.append(f"{name} is the only live arm")

    if failed:
        promote = None
        reason = f"keep running: {'; '.join(failed)}"
    else:
        promote = name
        lift = ""
        control_arm = by_name[control]
        if name != control and control_arm.mean != 0:
            lift = f" ({(candidate.mean - control_arm.mean) / abs(control_arm.mean):+.1%} vs {control})"
        reason = f"promote {name}{lift}: {'; '.join(passed)}"
    return StopDecision(promote=promote, reason=reason, probability_best=p_best, expected_loss=loss)
