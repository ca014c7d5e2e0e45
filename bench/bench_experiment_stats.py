"""Experiment statistics benchmark: is the stopping rule honest, and do the intervals cover?

Goals (DESIGN.md, "Outcomes and experiments": the false-winner rate of daily looks is measured):

1. Clear best (true rates 0.10, 0.10, 0.12: +20% relative for the third arm), the daily loop with
   batched top-two Thompson weights (beta 0.5, floor 1%) and :func:`stopping_decision`: >= 90%
   of seeds promote the true best within 30 days. The same loop with plain batched Thompson
   (floor 1%) and with an equal split is reported for comparison.
2. A/A (every arm at 0.10), looked at every day for 30 days: <= 5% of seeds promote anything.
   Measured on the same runs: how often the naive rule (P(best) >= 0.95 alone, daily) promotes.
3. Coverage at a fixed horizon with a fixed 50/50 split: the 95% interval of the difference
   covers the true difference in 93-97% of seeds 0-199 (the issue's wording). The relative-lift
   interval's figure on the same seeds, and both on 2,000 seeds, are reported next to it.
4. SRM: an injected 55/45 split of a 50/50 design is flagged at p < 0.001 in >= 99% of seeds
   at 10,000 entities, and a correct split (fixed or changing weights) in <= 1%.

The daily loop: each day ``--daily`` entities arrive and are assigned to the live arms with the
weights in force (top-two Thompson weights recomputed once a day from the cumulative posteriors,
beta 0.5, floor 1%, equal until every arm has 300 samples); outcomes are Bernoulli with each arm's true rate.
After each day the stopping rule looks (min 3 days, 300 samples per arm, P(best) >= 0.95,
expected loss <= 0.002, always-valid test at 95%); a run stops at its first promotion or after
30 days. Every seed is ``numpy.random.default_rng(seed)``.

The sequential test's mixing sd (``RELATIVE_MIXING_SD`` in stopping.py, 0.2 of the pooled mean)
was chosen with ``--seed-offset 1000 --relative-tau ...`` (seeds 1000-1049); the figures
reported use seeds 0-49. Top-two's beta (0.5, Russo's default) was not tuned; ``--beta`` varies
it, on seeds 1000+ only.

Run: ``.venv/bin/python bench/bench_experiment_stats.py`` (about a minute); ``--seeds N`` for
the adaptive scenarios, ``--seed-offset``, ``--relative-tau`` and ``--beta`` for tuning. Exits 1
when a goal is missed.
"""

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: ``python bench/bench_experiment_stats.py``
    sys.path.insert(0, str(REPO_ROOT))

from autoexec_dagster.experiments.statistics import (  # noqa: E402
    difference_interval,
    relative_lift_interval,
    srm_p_value,
    thompson_weights,
    top_two_weights,
)
from autoexec_dagster.experiments.stopping import (  # noqa: E402
    RELATIVE_MIXING_SD,
    ArmSummary,
    stopping_decision,
)

DAYS = 30
DAILY = 1_000
MIN_DAYS = 3
MIN_SAMPLES = 300
FLOOR = 0.01
PROBABILITY_BEST = 0.95
# A fifth of a percentage point on a 10% base rate: promoting risks at most 2% of the rate.
EXPECTED_LOSS = 0.002
CONFIDENCE = 0.95
NAMES = ("control", "b", "c")
CLEAR_RATES = (0.10, 0.10, 0.12)
AA_RATES = (0.10, 0.10, 0.10)
SRM_ALPHA = 0.001
TOP_TWO_BETA = 0.5
ALLOCATIONS = {
    "top-two": "top-two Thompson, beta 0.5, floor 1%",
    "thompson": "plain Thompson, floor 1% (comparison)",
    "equal": "equal split (comparison)",
}


class Check(NamedTuple):
    """One goal: what was measured, what it must be, and whether it is met."""

    name: str
    measured: str
    target: str
    ok: bool


@dataclass(frozen=True)
class Run:
    """One simulated experiment: when (if ever) each rule promoted, and what."""

    day: int | None
    promoted: str | None
    naive_day: int | None
    naive_promoted: str | None
    reason: str
    smallest_n: int  # the least-sampled arm's units when the rule promoted, or at the horizon


def simulate(
    rates: Sequence[float],
    seed: int,
    *,
    days: int,
    daily: int,
    relative_tau: float | None,
    allocation: str = "top-two",
    beta: float = TOP_TWO_BETA,
) -> Run:
    """The daily loop for one seed, with both rules looking at the same trajectory.

    Stopping ends the data, not changes it, so the loop runs the whole horizon and records the
    first day each rule promotes: the stopping rule's run is this trajectory up to that day.
    """
    rng = np.random.default_rng(seed)
    truth = np.asarray(rates, dtype=np.float64)
    names = NAMES[: truth.size]
    n = np.zeros(truth.size)
    conversions = np.zeros(truth.size)
    live = np.ones(truth.size, dtype=bool)
    found: dict[str, tuple[int, str]] = {}
    reason = ""
    smallest = 0
    for day in range(1, days + 1):
        if allocation == "top-two":
            weights, _why = top_two_weights(
                conversions,
                n,
                live=live,
                min_samples=MIN_SAMPLES,
                beta=beta,
                floor=FLOOR,
                names=names,
            )
        elif allocation == "thompson":
            weights, _why = thompson_weights(
                conversions, n, live=live, min_samples=MIN_SAMPLES, floor=FLOOR, names=names
            )
        else:
            weights = np.full(truth.size, 1.0 / truth.size)
        assigned = rng.multinomial(daily, weights)
        conversions += rng.binomial(assigned, truth)
        n += assigned
        means = conversions / np.maximum(n, 1)
        arms = [
            ArmSummary(name=name, n=int(count), mean=float(mean), variance=float(mean * (1 - mean)))
            for name, count, mean in zip(names, n, means, strict=True)
        ]
        tau2 = None
        if relative_tau is not None:
            tau2 = (relative_tau * float(conversions.sum() / n.sum())) ** 2
        decision = stopping_decision(
            arms,
            control=names[0],
            live=list(names),
            days_elapsed=day,
            min_days=MIN_DAYS,
            min_samples=MIN_SAMPLES,
            probability_best=PROBABILITY_BEST,
            expected_loss=EXPECTED_LOSS,
            binary=True,
            confidence=CONFIDENCE,
            tau2=tau2,
        )
        if "rule" not in found:
            reason = decision.reason
            smallest = int(n.min())
            if decision.promote is not None:
                found["rule"] = (day, decision.promote)
        leader = max(decision.probability_best, key=decision.probability_best.__getitem__)
        if "naive" not in found and decision.probability_best[leader] >= PROBABILITY_BEST:
            found["naive"] = (day, leader)
        if len(found) == 2:
            break
    day, promoted = found.get("rule", (None, None))
    naive_day, naive_promoted = found.get("naive", (None, None))
    return Run(day, promoted, naive_day, naive_promoted, reason, smallest)


def coverage(seeds: int, *, per_arm: int, rates: tuple[float, float]) -> tuple[float, float]:
    """Share of seeds whose 95% relative-lift and difference intervals cover the truth."""
    control_rate, treatment_rate = rates
    true_lift = treatment_rate / control_rate - 1
    true_difference = treatment_rate - control_rate
    lift_hits = difference_hits = 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        c = rng.binomial(per_arm, control_rate) / per_arm
        t = rng.binomial(per_arm, treatment_rate) / per_arm
        lift = relative_lift_interval(t, t * (1 - t), per_arm, c, c * (1 - c), per_arm)
        difference = difference_interval(t, t * (1 - t), per_arm, c, c * (1 - c), per_arm)
        lift_hits += lift.low <= true_lift <= lift.high
        difference_hits += difference.low <= true_difference <= difference.high
    return lift_hits / seeds, difference_hits / seeds


def srm_flag_rate(
    seeds: int, *, periods: int, daily: int, design: np.ndarray, actual: np.ndarray
) -> float:
    """Share of seeds where SRM is flagged (p < SRM_ALPHA), per-period design weights."""
    flagged = 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        observed = np.stack([rng.multinomial(daily, actual[p]) for p in range(periods)])
        flagged += srm_p_value(observed, design) < SRM_ALPHA
    return flagged / seeds


def _share(count: int, total: int) -> str:
    return f"{count}/{total} ({count / total:.0%})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the four scenarios, print the table, exit 1 when a goal is missed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=50, help="seeds per adaptive scenario")
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed (tune on 1000+)")
    parser.add_argument("--relative-tau", type=float, default=None, help="override tau / mean")
    parser.add_argument("--beta", type=float, default=TOP_TWO_BETA, help="top-two's beta")
    parser.add_argument("--daily", type=int, default=DAILY)
    parser.add_argument("--coverage-seeds", type=int, default=200)
    parser.add_argument("--srm-seeds", type=int, default=1_000)
    args = parser.parse_args(argv)
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    tau_label = args.relative_tau if args.relative_tau is not None else RELATIVE_MIXING_SD
    started = time.perf_counter()
    checks: list[Check] = []
    notes: list[str] = []

    for allocation, label in ALLOCATIONS.items():
        if allocation == "top-two" and args.beta != TOP_TWO_BETA:
            label = f"top-two Thompson, beta {args.beta:g}, floor 1%"
        # Only the design's allocation is held to the goals; the others say what it buys.
        gated = allocation == "top-two"
        clear = [
            simulate(
                CLEAR_RATES,
                s,
                days=DAYS,
                daily=args.daily,
                relative_tau=args.relative_tau,
                allocation=allocation,
                beta=args.beta,
            )
            for s in seeds
        ]
        right = sum(run.promoted == NAMES[2] for run in clear)
        wrong = sum(run.promoted not in (None, NAMES[2]) for run in clear)
        decided_days = [run.day for run in clear if run.day is not None]
        median_day = statistics.median(decided_days) if decided_days else math.nan
        least = statistics.median(run.smallest_n for run in clear)
        checks.append(
            Check(
                f"{label}: clear best {CLEAR_RATES} promoted within {DAYS} days "
                f"({wrong} wrong; median decision day {median_day:g}; least-sampled arm "
                f"{least:,.0f} units, median)",
                _share(right, len(clear)),
                ">= 90%" if gated else "(comparison)",
                right >= 0.9 * len(clear) or not gated,
            )
        )
        aa = [
            simulate(
                AA_RATES,
                s,
                days=DAYS,
                daily=args.daily,
                relative_tau=args.relative_tau,
                allocation=allocation,
                beta=args.beta,
            )
            for s in seeds
        ]
        false_winners = sum(run.promoted is not None for run in aa)
        naive_winners = sum(run.naive_promoted is not None for run in aa)
        checks.append(
            Check(
                f"{label}: A/A {AA_RATES}, daily looks for {DAYS} days, promotes anything",
                _share(false_winners, len(aa)),
                "<= 5%" if gated else "(comparison)",
                false_winners <= 0.05 * len(aa) or not gated,
            )
        )
        ratio = (
            f"{naive_winners / false_winners:.1f}x the stopping rule"
            if false_winners
            else "the stopping rule none"
        )
        checks.append(
            Check(
                f"{label}: same A/A runs, naive rule (P(best) >= 0.95 alone, daily)",
                f"{_share(naive_winners, len(aa))}; {ratio}",
                "(baseline)",
                True,
            )
        )
        undecided = [run for run in clear if run.promoted is None]
        if undecided:
            notes.append(
                f"{label}, clear best, seed {seeds.start + clear.index(undecided[0])} undecided "
                f"after {DAYS} days: {undecided[0].reason}"
            )

    # Two arms are where the naive rule errs most; 200 seeds pin the rule's rate down to about
    # +-1.5 points where 50 would leave +-3. With two arms top-two at beta 0.5 is a 50/50 split
    # (the runner-up is the other arm), so plain Thompson is run too: its weights chase the noise.
    pair_seeds = range(args.seed_offset, args.seed_offset + 4 * args.seeds)
    for allocation in ("top-two", "thompson"):
        pair = [
            simulate(
                AA_RATES[:2],
                s,
                days=DAYS,
                daily=args.daily,
                relative_tau=args.relative_tau,
                allocation=allocation,
                beta=args.beta,
            )
            for s in pair_seeds
        ]
        pair_rule = sum(run.promoted is not None for run in pair)
        pair_naive = sum(run.naive_promoted is not None for run in pair)
        checks.append(
            Check(
                f"{ALLOCATIONS[allocation]}: A/A with 2 arms (0.1, 0.1), daily looks for {DAYS} "
                f"days, seeds {pair_seeds.start}-{pair_seeds.stop - 1}: stopping rule / naive rule",
                f"{_share(pair_rule, len(pair))} / {_share(pair_naive, len(pair))}",
                "<= 5% / (baseline)",
                pair_rule <= 0.05 * len(pair),
            )
        )

    per_arm = 10_000
    # The goal as the issue states it: the difference interval on seeds 0-199. 200 seeds measure
    # coverage to +-1.5 points (one sd), so even a correct 95% interval lands outside 93-97%
    # about one time in seven: the relative-lift figure on the same seeds is shown beside it
    # whatever it is, and both on 2,000 seeds (+-0.5 points) say whether a miss is noise.
    for count in (args.coverage_seeds, 10 * args.coverage_seeds):
        lift_cover, difference_cover = coverage(count, per_arm=per_arm, rates=(0.10, 0.12))
        for label, value in (("difference", difference_cover), ("relative lift", lift_cover)):
            gated = label == "difference" and count == args.coverage_seeds
            inside = 0.93 <= value <= 0.97
            checks.append(
                Check(
                    f"coverage of the 95% {label} interval, seeds 0-{count - 1}, "
                    f"{per_arm:,} per arm, 0.10 vs 0.12",
                    f"{value:.1%}" + ("" if inside else " (outside 93-97%)"),
                    "93-97%" if gated else "(reported)",
                    inside or not gated,
                )
            )

    fifty = np.full((10, 2), 0.5)
    skewed = np.tile([0.55, 0.45], (10, 1))
    for periods in (1, 2, 10):
        caught = srm_flag_rate(
            args.srm_seeds,
            periods=periods,
            daily=1_000,
            design=fifty[:periods],
            actual=skewed[:periods],
        )
        goal = periods == 10
        checks.append(
            Check(
                f"SRM 55/45 on a 50/50 design, {periods * 1_000:,} entities over {periods} "
                f"period(s), flagged at p < {SRM_ALPHA:g}",
                f"{caught:.1%}",
                ">= 99%" if goal else "(context)",
                caught >= 0.99 if goal else True,
            )
        )
    false_alarm = srm_flag_rate(args.srm_seeds, periods=10, daily=1_000, design=fifty, actual=fifty)
    checks.append(
        Check(
            f"SRM false alarms, correct 50/50, 10,000 entities over 10 periods, {args.srm_seeds:,} seeds",
            f"{false_alarm:.1%}",
            "<= 1%",
            false_alarm <= 0.01,
        )
    )
    changing = np.array([[0.5, 0.5], [0.7, 0.3], [0.9, 0.1]] * 3 + [[0.2, 0.8]])
    false_alarm_changing = srm_flag_rate(
        args.srm_seeds, periods=10, daily=1_000, design=changing, actual=changing
    )
    checks.append(
        Check(
            "SRM false alarms, correct split, weights changing every period (10 periods)",
            f"{false_alarm_changing:.1%}",
            "<= 1%",
            false_alarm_changing <= 0.01,
        )
    )

    elapsed = time.perf_counter() - started
    print(
        f"seeds {seeds.start}-{seeds.stop - 1}, {args.daily:,} entities/day, tau = "
        f"{tau_label:g} x pooled mean, top-two beta {args.beta:g}, {elapsed:.0f} s"
    )
    print("| goal | measured | target | result |")
    print("| --- | ---: | --- | --- |")
    for check in checks:
        print(
            f"| {check.name} | {check.measured} | {check.target} | {'ok' if check.ok else '**MISSED**'} |"
        )
    for note in notes:
        print(f"\n{note}")
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
