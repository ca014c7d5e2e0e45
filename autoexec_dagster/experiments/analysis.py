"""The analysis of an experiment: per-variant figures from units joined to their outcomes.

Pure and vectorised (no I/O): :func:`analyse_experiment` takes the experiment's units (each
entity's first exposure and its variant), the holdout's units, the outcome table and the design
(each period's assignments and weights) and returns every figure
:func:`~autoexec_dagster.update_experiment` decides on: per variant n, conversions, rate and its
interval, probability of being best, expected loss, lift against the control and against the
holdout with intervals, and guardrail rates; and the sample-ratio-mismatch p-value.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from autoexec_dagster.experiments.experiment import Experiment
from autoexec_dagster.experiments.outcomes import is_binary, join_window
from autoexec_dagster.experiments.statistics import (
    Interval,
    beta_binomial_best,
    difference_interval,
    gaussian_best,
    relative_lift_interval,
    srm_p_value,
)

VARIANT_COLUMNS: tuple[str, ...] = (
    "variant",
    "n",
    "conversions",
    "rate",
    "ci_low",
    "ci_high",
    "probability_best",
    "expected_loss",
    "lift_vs_control",
    "lift_vs_control_low",
    "lift_vs_control_high",
    "lift_vs_holdout",
    "lift_vs_holdout_low",
    "lift_vs_holdout_high",
    "difference_vs_holdout",
    "difference_vs_holdout_low",
    "difference_vs_holdout_high",
    "weight",
    "status",
)
# The SRM check flags a design mismatch below this p-value.
SRM_ALPHA = 0.001


@dataclass(frozen=True, slots=True)
class ArmFigures:
    """The sufficient statistics of one arm on one metric.

    Attributes:
        n: Units.
        total: Sum of the metric (conversions for a 0/1 metric).
        mean: Mean per unit.
        variance: Sample variance of one unit.
    """

    n: int
    total: float
    mean: float
    variance: float


@dataclass(frozen=True)
class ExperimentAnalysis:
    """Every figure of one analysis.

    Attributes:
        variants: One row per variant (:data:`VARIANT_COLUMNS` without weight and status, which
            the caller fills in) plus one ``<guardrail>_rate`` column per guardrail.
        arms: Variant -> figures on the metric (for the stopping rule).
        holdout: The holdout's figures on the metric (None without a holdout).
        binary: Whether the metric is 0/1.
        srm_p_value: The sample-ratio-mismatch p-value of the assignments against each period's
            weights (1.0 when there is nothing to test).
        outcomes_before_exposure: Outcome rows ignored because they came before the exposure.
        open_windows: Share of units whose outcome window had not closed at ``as_of``.
    """

    variants: pd.DataFrame
    arms: dict[str, ArmFigures]
    holdout: ArmFigures | None
    binary: bool
    srm_p_value: float
    outcomes_before_exposure: int
    open_windows: float
    guardrail_rates: dict[str, dict[str, float]] = field(default_factory=dict)


def _figures(values: np.ndarray) -> ArmFigures:
    n = int(values.size)
    if n == 0:
        return ArmFigures(0, 0.0, math.nan, math.nan)
    total = float(values.sum())
    mean = total / n
    variance = float(values.var(ddof=1)) if n > 1 else math.nan
    return ArmFigures(n, total, mean, variance)


def _interval(a: ArmFigures, b: ArmFigures, *, confidence: float, relative: bool) -> Interval:
    compute = relative_lift_interval if relative else difference_interval
    return compute(a.mean, a.variance, a.n, b.mean, b.variance, b.n, confidence=confidence)


def _rate_interval(a: ArmFigures, *, confidence: float) -> tuple[float, float]:
    if a.n < 2 or not math.isfinite(a.variance):
        return (math.nan, math.nan)
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, a.n - 1)) * math.sqrt(a.variance / a.n)
    return (a.mean - half, a.mean + half)


def srm_check(
    assignments: pd.DataFrame,
    period_weights: Mapping[str, Mapping[str, float]],
    order: Sequence[str],
) -> float:
    """The SRM p-value of ``assignments`` (period, variant) against each period's weights."""
    if assignments.empty:
        return 1.0
    periods = [p for p in sorted(assignments["period"].unique()) if p in period_weights]
    if not periods:
        return 1.0
    counts = (
        assignments[assignments["period"].isin(periods)]
        .groupby(["period", "variant"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=periods, columns=list(order), fill_value=0)
    )
    shares = np.array(
        [[float(period_weights[p].get(v, 0.0)) for v in order] for p in periods], dtype=float
    )
    return float(srm_p_value(counts.to_numpy(dtype=float), shares))


def analyse_experiment(
    experiment: Experiment,
    *,
    units: pd.DataFrame,
    outcomes: pd.DataFrame,
    holdout_units: pd.DataFrame | None = None,
    assignments: pd.DataFrame | None = None,
    period_weights: Mapping[str, Mapping[str, float]] | None = None,
    as_of: pd.Timestamp | None = None,
) -> ExperimentAnalysis:
    """Analyse an experiment.

    Args:
        experiment: The experiment.
        units: One row per entity in the test: ``entity_id``, ``variant``, ``exposed_at`` (UTC).
        outcomes: entity_id, occurred_at and the metric and guardrail columns.
        holdout_units: The holdout's entities (``entity_id``, ``exposed_at``), for the lift
            against the holdout.
        assignments: ``period`` and ``variant`` per assignment (for the SRM check).
        period_weights: Period -> the weights its assignments were drawn with.
        as_of: The time of the analysis (for the share of windows still open).

    Returns:
        The :class:`ExperimentAnalysis`.
    """
    metrics = experiment.outcome_columns()
    window = experiment.window_seconds
    kinds = {m: is_binary(outcomes[m]) if len(outcomes) else True for m in metrics}
    joined, before = join_window(
        units, outcomes, metrics=metrics, window_seconds=window, binary=kinds
    )
    held = None
    if holdout_units is not None and len(holdout_units):
        held_joined, held_before = join_window(
            holdout_units, outcomes, metrics=metrics, window_seconds=window, binary=kinds
        )
        held = _figures(held_joined[experiment.metric].to_numpy(dtype=float))
        before += held_before
    binary = kinds[experiment.metric]
    names = list(experiment.variants)
    codes = pd.Categorical(joined["variant"], categories=names).codes
    values = joined[experiment.metric].to_numpy(dtype=float)
    arms = {name: _figures(values[codes == i]) for i, name in enumerate(names)}
    n = np.array([arms[v].n for v in names], dtype=float)
    if binary:
        conversions = np.array([arms[v].total for v in names], dtype=float)
        best, loss = beta_binomial_best(conversions, n)
    else:
        means = np.array([arms[v].mean if arms[v].n else 0.0 for v in names])
        var_of_mean = np.array(
            [
                arms[v].variance / arms[v].n
                if arms[v].n > 1 and math.isfinite(arms[v].variance)
                else 1e12
                for v in names
            ]
        )
        best, loss = gaussian_best(means, var_of_mean)
    control = arms[experiment.control]
    rows = []
    guardrail_rates: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        arm = arms[name]
        low, high = _rate_interval(arm, confidence=experiment.confidence)
        vs_control = _interval(arm, control, confidence=experiment.confidence, relative=True)
        none = Interval(math.nan, math.nan, math.nan, math.nan)
        vs_holdout = (
            _interval(arm, held, confidence=experiment.confidence, relative=True)
            if held is not None
            else none
        )
        # Absolute too: when the holdout's rate is 0 (it cannot click an email it never got)
        # a relative lift is undefined, and the difference is the effect.
        diff_holdout = (
            _interval(arm, held, confidence=experiment.confidence, relative=False)
            if held is not None
            else none
        )
        row = {
            "variant": name,
            "n": arm.n,
            "conversions": arm.total,
            "rate": arm.mean,
            "ci_low": low,
            "ci_high": high,
            "probability_best": float(best[i]),
            "expected_loss": float(loss[i]),
            "lift_vs_control": math.nan if name == experiment.control else vs_control.estimate,
            "lift_vs_control_low": math.nan if name == experiment.control else vs_control.low,
            "lift_vs_control_high": math.nan if name == experiment.control else vs_control.high,
            "lift_vs_holdout": vs_holdout.estimate,
            "lift_vs_holdout_low": vs_holdout.low,
            "lift_vs_holdout_high": vs_holdout.high,
            "difference_vs_holdout": diff_holdout.estimate,
            "difference_vs_holdout_low": diff_holdout.low,
            "difference_vs_holdout_high": diff_holdout.high,
        }
        for guard in experiment.guardrails:
            rate = (
                float(joined[guard].to_numpy(dtype=float)[codes == i].mean()) if arm.n else math.nan
            )
            row[f"{guard}_rate"] = rate
            guardrail_rates.setdefault(guard, {})[name] = rate
        rows.append(row)
    srm = srm_check(assignments, period_weights or {}, names) if assignments is not None else 1.0
    open_share = 0.0
    if as_of is not None and len(joined):
        closes = joined["exposed_at"] + pd.Timedelta(seconds=window)
        open_share = float((closes > as_of).mean())
    return ExperimentAnalysis(
        variants=pd.DataFrame(rows),
        arms=arms,
        holdout=held,
        binary=binary,
        srm_p_value=srm,
        outcomes_before_exposure=before,
        open_windows=open_share,
        guardrail_rates=guardrail_rates,
    )
