"""The stopping rule: its always-valid interval against gbstats' published sequential figures,
and the criteria it refuses and promotes on."""

import math

import numpy as np
import pytest
from scipy import stats

from autoexec_dagster.experiments.statistics import relative_lift_interval
from autoexec_dagster.experiments.stopping import (
    RELATIVE_MIXING_SD,
    ArmSummary,
    StopDecision,
    always_valid_interval,
    stopping_decision,
)


def _gbstats_rho(alpha: float, tuning: float) -> float:
    """gbstats ``sequential_rho`` (Waudby-Smith et al. eq. 161): the mixing sd per unit sd."""
    return math.sqrt((-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning)


def _sample_mean(total: float, squares: float, n: int) -> tuple[float, float, int]:
    return total / n, (squares - total**2 / n) / (n - 1), n


def _relative(
    treatment: tuple[float, float, int], control: tuple[float, float, int]
) -> tuple[float, float]:
    """gbstats' relative estimate and its delta-method variance."""
    (mean_t, var_t, n_t), (mean_c, var_c, n_c) = treatment, control
    estimate = relative_lift_interval(mean_t, var_t, n_t, mean_c, var_c, n_c).estimate
    return estimate, var_t / (n_t * mean_c**2) + var_c * mean_t**2 / (n_c * mean_c**4)


@pytest.mark.parametrize(
    ("control", "treatment", "tuning", "expected"),
    [
        # gbstats tests/frequentist/test_tests.py, test_sequential_test_runs: expected 0.50336,
        # ci (-0.55844, 1.56516), tuning parameter 1000.
        (
            _sample_mean(1396.87, 52377.9767, 3000),
            _sample_mean(2422.7, 134698.29, 3461),
            1000,
            (-0.55844, 1.56516),
        ),
        # test_sequential_test_runs_prop: ProportionStatistic(1396, 3000) against (2422, 3461),
        # the default tuning parameter 5000: ci (0.40098, 0.60675).
        (
            (1396 / 3000, 1396 / 3000 * (1 - 1396 / 3000), 3000),
            (2422 / 3461, 2422 / 3461 * (1 - 2422 / 3461), 3461),
            5000,
            (0.40098, 0.60675),
        ),
    ],
)
def test_gbstats_published_sequential_intervals(
    control: tuple[float, float, int],
    treatment: tuple[float, float, int],
    tuning: float,
    expected: tuple[float, float],
) -> None:
    # gbstats' halfwidth is ours with tau^2 = s^2 rho^2, s^2 = N V the per-unit variance over
    # both arms (N = n_a + n_b): (V + tau^2) / V = N rho^2 + 1, V (V + tau^2) / tau^2 =
    # s^2 (N rho^2 + 1) / (N^2 rho^2).
    estimate, variance = _relative(treatment, control)
    total = control[2] + treatment[2]
    tau2 = variance * total * _gbstats_rho(0.05, tuning) ** 2
    low, high = always_valid_interval(estimate, variance, tau2=tau2, alpha=0.05)
    assert (round(low, 5), round(high, 5)) == expected


def test_always_valid_interval_is_wider_than_the_fixed_horizon_one() -> None:
    low, high = always_valid_interval(0.02, 1e-5, tau2=4e-4, alpha=0.05)
    assert low == pytest.approx(0.02 - (high - 0.02))
    fixed = stats.norm.ppf(0.975) * math.sqrt(1e-5)
    assert high - 0.02 > 1.5 * fixed
    # More data (a smaller variance) tightens it; a smaller alpha widens it.
    assert always_valid_interval(0.02, 1e-6, tau2=4e-4, alpha=0.05)[0] > low
    assert always_valid_interval(0.02, 1e-5, tau2=4e-4, alpha=0.01)[0] < low


def test_always_valid_interval_degenerate_and_invalid() -> None:
    assert all(math.isnan(v) for v in always_valid_interval(0.1, 0.0, tau2=1.0, alpha=0.05))
    assert all(math.isnan(v) for v in always_valid_interval(math.nan, 1.0, tau2=1.0, alpha=0.05))
    with pytest.raises(ValueError, match="tau2"):
        always_valid_interval(0.1, 1.0, tau2=0.0, alpha=0.05)
    with pytest.raises(ValueError, match="alpha"):
        always_valid_interval(0.1, 1.0, tau2=1.0, alpha=1.0)


def test_always_valid_interval_holds_under_daily_looks() -> None:
    # 2,000 seeded A/A paths of a difference of two 0.1 rates, looked at after each of 30 days of
    # 500 units per arm: the interval at 95% must exclude the true 0 on some day in <= 5%.
    rng = np.random.default_rng(8)
    paths, days, daily = 2000, 30, 500
    a = np.cumsum(rng.binomial(daily, 0.1, size=(paths, days)), axis=1)
    b = np.cumsum(rng.binomial(daily, 0.1, size=(paths, days)), axis=1)
    n = daily * np.arange(1, days + 1)
    pa, pb = a / n, b / n
    variance = (pa * (1 - pa) + pb * (1 - pb)) / n
    crossed = np.zeros(paths, dtype=bool)
    naive = np.zeros(paths, dtype=bool)
    for path in range(paths):
        for day in range(days):
            estimate, v = float(pa[path, day] - pb[path, day]), float(variance[path, day])
            low, high = always_valid_interval(estimate, v, tau2=0.02**2, alpha=0.05)
            crossed[path] |= low > 0 or high < 0
            naive[path] |= abs(estimate) > 1.96 * math.sqrt(v)
    assert crossed.mean() <= 0.05
    assert naive.mean() > 0.15  # the fixed-horizon interval, looked at daily, errs far more


def _arms(*figures: tuple[str, int, float]) -> list[ArmSummary]:
    return [ArmSummary(name, n, mean, mean * (1 - mean)) for name, n, mean in figures]


RULE = {
    "control": "control",
    "min_days": 3,
    "min_samples": 300,
    "probability_best": 0.95,
    "expected_loss": 0.002,
    "binary": True,
}


def _decide(arms: list[ArmSummary], days: float, **overrides: object) -> StopDecision:
    settings: dict = {**RULE, "live": [arm.name for arm in arms], **overrides}
    return stopping_decision(arms, days_elapsed=days, **settings)


CLEAR = _arms(("control", 20_000, 0.100), ("b", 20_000, 0.101), ("c", 20_000, 0.125))


def test_promotes_a_clear_winner_with_big_samples() -> None:
    decision = _decide(CLEAR, days=14)
    assert decision.promote == "c"
    assert decision.reason.startswith("promote c (+25.0% vs control): ")
    assert "always-valid 95% test: c beats control" in decision.reason
    assert decision.probability_best["c"] > 0.999
    assert sum(decision.probability_best.values()) == pytest.approx(1.0)
    assert decision.expected_loss["c"] < 1e-6 < decision.expected_loss["control"]


def test_refuses_before_min_days_and_names_it() -> None:
    decision = _decide(CLEAR, days=2)
    assert decision.promote is None
    assert decision.reason == "keep running: ran 2 of 3 days"
    assert decision.probability_best["c"] > 0.999  # the posteriors are still reported


def test_refuses_before_min_samples_and_names_the_arm() -> None:
    arms = _arms(("control", 5000, 0.08), ("b", 250, 0.06), ("c", 5000, 0.15))
    decision = _decide(arms, days=10)
    assert decision.promote is None
    assert "b has 250 of 300 samples" in decision.reason
    assert "days" not in decision.reason


def test_refuses_on_probability_and_loss() -> None:
    arms = _arms(("control", 1000, 0.100), ("c", 1000, 0.104))
    decision = _decide(arms, days=10)
    assert decision.promote is None
    assert "P(best) of c 0.6" in decision.reason and "< 0.95" in decision.reason
    assert "expected loss of c" in decision.reason and "> 0.002" in decision.reason


def test_the_always_valid_test_refuses_what_p_best_alone_would_promote() -> None:
    # 2,000 per arm, 0.10 against 0.12: P(best) 0.98 and a tiny loss, but the difference is two
    # standard errors, where a test valid under daily looks cannot yet tell.
    arms = _arms(("control", 2000, 0.10), ("c", 2000, 0.12))
    decision = _decide(arms, days=10)
    assert decision.probability_best["c"] > 0.95
    assert decision.expected_loss["c"] < 0.002
    assert decision.promote is None
    assert decision.reason.startswith(
        "keep running: always-valid 95% test does not show c beats control (difference +0.02"
    )


def test_only_live_arms_compete() -> None:
    arms = [*CLEAR, ArmSummary("retired", 10, 0.9, 0.09)]
    decision = _decide(arms, days=14, live=["control", "b", "c"])
    assert decision.promote == "c"
    assert set(decision.probability_best) == {"control", "b", "c"}


def test_a_lone_live_arm_is_promoted_once_the_gates_pass() -> None:
    decision = _decide(CLEAR, days=5, live=["b"])
    assert decision.promote == "b"
    assert "b is the only live arm" in decision.reason


def test_numeric_metric_uses_normal_posteriors() -> None:
    arms = [
        ArmSummary("control", 4000, 52.0, 400.0),
        ArmSummary("b", 4000, 55.0, 420.0),
    ]
    decision = _decide(arms, days=7, binary=False, expected_loss=0.5)
    assert decision.promote == "b"
    tiny = [ArmSummary("control", 1, 52.0, 0.0), ArmSummary("b", 4000, 55.0, 420.0)]
    refused = _decide(tiny, days=7, binary=False, min_samples=1, expected_loss=0.5)
    assert refused.promote is None
    assert "P(best) undefined" in refused.reason
    assert math.isnan(refused.probability_best["b"])


def test_default_mixing_variance_follows_the_pooled_mean() -> None:
    pooled = sum(arm.n * arm.mean for arm in CLEAR) / sum(arm.n for arm in CLEAR)
    explicit = _decide(CLEAR, days=14, tau2=(RELATIVE_MIXING_SD * pooled) ** 2)
    assert explicit == _decide(CLEAR, days=14)
    # A mixing variance far from the effect's scale costs power: the same data is not enough.
    assert _decide(CLEAR, days=14, tau2=1e-12).promote is None


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="control"):
        _decide(CLEAR, days=5, control="nobody")
    with pytest.raises(ValueError, match="live"):
        _decide(CLEAR, days=5, live=["control", "ghost"])
    with pytest.raises(ValueError, match="twice"):
        _decide([*CLEAR, CLEAR[0]], days=5)
    with pytest.raises(ValueError, match="at least one"):
        _decide(CLEAR, days=5, live=[])
    with pytest.raises(ValueError, match="variance"):
        _decide([ArmSummary("control", 10, 0.1, -1.0)], days=5)


def test_the_reason_says_so_when_there_is_no_spread_to_bound_the_difference() -> None:
    from autoexec_dagster.experiments.stopping import ArmSummary, stopping_decision

    arms = [ArmSummary("a", 2_000, 0.0, 0.0), ArmSummary("b", 2_000, 0.0, 0.0)]
    decision = stopping_decision(
        arms,
        control="a",
        live=["a", "b"],
        days_elapsed=5,
        min_days=1,
        min_samples=100,
        probability_best=0.95,
        expected_loss=0.01,
        binary=True,
    )
    assert decision.promote is None
    assert "nan" not in decision.reason
    assert "no spread in the outcomes yet to bound it" in decision.reason


def test_days_are_shown_in_tenths_rounded_down() -> None:
    almost = _decide(CLEAR, days=2.96)
    assert almost.reason == "keep running: ran 2.9 of 3 days"
    assert "ran 4.6 days (min 3)" in _decide(CLEAR, days=14 / 3 - 0.01).reason
