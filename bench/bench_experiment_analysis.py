"""Experiment analysis benchmark (issue 9): 1,000,000 assignments analysed with their outcomes.

Generated, seeded: ``--units`` entities (1,000,000) assigned over 30 daily periods to three
variants under Thompson-like weights that change every period, plus a 10% holdout; each entity's
exposure time within its day; outcome rows for the converted ones (about 11%) and a guardrail
column (unsubscribes), some before the exposure and some after the window, as real tables have.

Measured: :func:`~autoexec_dagster.experiments.analysis.analyse_experiment` (the window join, the
per-variant figures, P(best) and expected loss, the lift intervals against the control and the
holdout, guardrail rates, the SRM check against each period's weights), median of ``--repeats``.
Goal: <= 2 s. Baseline, in the same run on the same frames: what a person writes to get only the
conversion rate per variant (merge the outcomes onto the units, keep those in the window, group
by variant); the ratio says what the statistics and the checks cost on top of that.

Also timed, for information (``--ledger``): the same figures through ``update_experiment`` from a
SQLite ledger holding the exposures, the assignments and the outcomes (reading them dominates).

Run alone: ``.venv/bin/python -m bench.bench_experiment_analysis [--units N] [--ledger]``.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoexec_dagster import Experiment
from autoexec_dagster.experiments.analysis import analyse_experiment
from bench.bench_routing import SEED, Check, finish, machine_busy_seconds, other_load

TARGET_SECONDS = 2.0
VARIANTS = ("control", "bold", "short")
TRUE_RATES = {"control": 0.10, "bold": 0.12, "short": 0.10, "holdout": 0.08}
START = datetime(2026, 11, 1, tzinfo=UTC)
DAYS = 30


def experiment() -> Experiment:
    return Experiment(
        name="bench",
        variants={v: {"subject": v} for v in VARIANTS},
        control="control",
        metric="clicked",
        window="3d",
        guardrails={"unsubscribed": 0.02},
    )


def generate(units: int, *, seed: int = SEED) -> dict[str, Any]:
    """Units, holdout units, outcomes, assignments and period weights."""
    rng = np.random.default_rng(seed)
    day = rng.integers(0, DAYS, size=units)
    # Weights drift towards "bold" over the periods, as batched Thompson sampling would move them.
    drift = np.linspace(0.0, 0.6, DAYS)
    weights = np.stack([(1 - drift) / 3, (1 - drift) / 3 + drift, (1 - drift) / 3], axis=1)
    draws = rng.random(units)
    variant_codes = (draws[:, None] > np.cumsum(weights[day], axis=1)).sum(axis=1)
    variant_codes = np.minimum(variant_codes, len(VARIANTS) - 1)
    seconds = day * 86_400 + rng.integers(0, 86_400, size=units)
    exposed = pd.Timestamp(START) + pd.to_timedelta(seconds, unit="s")
    ids = np.char.add("e", np.arange(units).astype(str)).astype(object)
    variants = np.array(VARIANTS, dtype=object)[variant_codes]
    unit_frame = pd.DataFrame({"entity_id": ids, "variant": variants, "exposed_at": exposed})
    n_hold = units // 9
    hold_seconds = rng.integers(0, DAYS * 86_400, size=n_hold)
    holdout = pd.DataFrame(
        {
            "entity_id": np.char.add("h", np.arange(n_hold).astype(str)).astype(object),
            "exposed_at": pd.Timestamp(START) + pd.to_timedelta(hold_seconds, unit="s"),
        }
    )
    rates = np.array([TRUE_RATES[v] for v in VARIANTS])[variant_codes]
    clicked = rng.random(units) < rates
    held_clicked = rng.random(n_hold) < TRUE_RATES["holdout"]
    who = np.concatenate([ids[clicked], holdout["entity_id"].to_numpy()[held_clicked]])
    when = np.concatenate(
        [exposed[clicked].to_numpy(), holdout["exposed_at"].to_numpy()[held_clicked]]
    )
    # Mostly within two days; 3% before the action, 5% after the window.
    offset = rng.exponential(12 * 3_600, size=len(who))
    offset[rng.random(len(who)) < 0.03] = -3_600
    offset[rng.random(len(who)) < 0.05] = 5 * 86_400
    outcomes = pd.DataFrame(
        {
            "entity_id": who,
            "occurred_at": pd.to_datetime(when, utc=True) + pd.to_timedelta(offset, unit="s"),
            "clicked": 1.0,
            "unsubscribed": (rng.random(len(who)) < 0.01).astype(float),
        }
    )
    periods = [f"2026-11-{d + 1:02d}" if d < 30 else f"2026-12-{d - 29:02d}" for d in range(DAYS)]
    assignments = pd.DataFrame(
        {"period": np.array(periods, dtype=object)[day], "variant": variants}
    )
    period_weights = {
        periods[d]: {v: float(weights[d, i]) for i, v in enumerate(VARIANTS)} for d in range(DAYS)
    }
    return {
        "units": unit_frame,
        "holdout": holdout,
        "outcomes": outcomes,
        "assignments": assignments,
        "period_weights": period_weights,
    }


def baseline(data: dict[str, Any], window_seconds: float) -> pd.Series:
    """Conversion rate per variant, the way one would write it by hand."""
    units, outcomes = data["units"], data["outcomes"]
    pairs = units.merge(outcomes[["entity_id", "occurred_at"]], on="entity_id", how="inner")
    delta = (pairs["occurred_at"] - pairs["exposed_at"]).dt.total_seconds()
    inside = pairs[(delta >= 0) & (delta < window_seconds)]
    converted = inside.drop_duplicates("entity_id").groupby("variant").size()
    return converted / units.groupby("variant").size()


def run(*, units: int, repeats: int, ledger: bool = False) -> dict[str, Any]:
    """Generate, then time the analysis and the baseline (and optionally the ledger path)."""
    data = generate(units)
    spec = experiment()
    as_of = pd.Timestamp(START + timedelta(days=DAYS + 1))
    busy, cpu, wall = machine_busy_seconds(), time.process_time(), time.perf_counter()
    analysis_times, baseline_times = [], []
    result = None
    rates = None
    for _ in range(repeats):
        t = time.perf_counter()
        result = analyse_experiment(
            spec,
            units=data["units"],
            outcomes=data["outcomes"],
            holdout_units=data["holdout"],
            assignments=data["assignments"],
            period_weights=data["period_weights"],
            as_of=as_of,
        )
        analysis_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        rates = baseline(data, spec.window_seconds)
        baseline_times.append(time.perf_counter() - t)
    assert result is not None and rates is not None
    figures = result.variants.set_index("variant")
    # The two computations must agree on what they share, or the comparison means nothing.
    agree = bool(np.allclose(figures["rate"].reindex(rates.index), rates.to_numpy(), atol=1e-12))
    out: dict[str, Any] = {
        "units": units,
        "holdout_units": len(data["holdout"]),
        "outcome_rows": len(data["outcomes"]),
        "repeats": repeats,
        "analysis_seconds": analysis_times,
        "analysis_median": statistics.median(analysis_times),
        "baseline_seconds": baseline_times,
        "baseline_median": statistics.median(baseline_times),
        "agree": agree,
        "rates": {str(k): round(float(v), 5) for k, v in figures["rate"].items()},
        "probability_best": {
            str(k): round(float(v), 4) for k, v in figures["probability_best"].items()
        },
        "srm_p_value": result.srm_p_value,
        "outcomes_before_exposure": result.outcomes_before_exposure,
    }
    out["ratio"] = out["analysis_median"] / out["baseline_median"]
    if ledger:
        out["ledger_seconds"] = _ledger_path(data, spec)
    out["other_load"] = other_load(
        machine_busy_seconds() - busy, time.process_time() - cpu, time.perf_counter() - wall
    )
    return out


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    # SQLAlchemy's executemany wants str-keyed rows; a frame's records are keyed by Hashable.
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def _ledger_path(data: dict[str, Any], spec: Experiment) -> float:
    """update_experiment over a SQLite ledger holding the same exposures and outcomes."""
    import sqlalchemy as sa

    from autoexec_dagster import ActionLedger, Playbook, Rule, update_experiment
    from autoexec_dagster.ledger import schema

    with tempfile.TemporaryDirectory() as tmp:
        clock_now = [START + timedelta(days=DAYS + 1)]
        led = ActionLedger(f"sqlite:///{Path(tmp) / 'ledger.db'}", clock=lambda: clock_now[0])
        book = Playbook(
            name="bench",
            entity_key="entity_id",
            rules=[Rule(name="r", when="score >= 0", action="mail", experiment=spec)],
        )
        led.start_experiment(playbook="bench", experiment=spec, rule="r", action="mail")
        units, hold = data["units"], data["holdout"]
        exposures = pd.concat(
            [
                pd.DataFrame(
                    {
                        "entity_id": units["entity_id"],
                        "arm": units["variant"],
                        "exposed_at": units["exposed_at"],
                    }
                ),
                pd.DataFrame(
                    {
                        "entity_id": hold["entity_id"],
                        "arm": "holdout",
                        "exposed_at": hold["exposed_at"],
                    }
                ),
            ]
        )
        exposures = exposures.assign(
            playbook="bench",
            action="mail",
            partition_key="p",
            experiment="bench",
            idempotency_key=exposures["entity_id"],
        )
        exposures["exposed_at"] = exposures["exposed_at"].dt.to_pydatetime()
        with led.engine.begin() as conn:
            conn.execute(sa.insert(schema.exposures), _records(exposures))
            assignments = pd.DataFrame(
                {
                    "playbook": "bench",
                    "experiment": "bench",
                    "entity_id": units["entity_id"],
                    "variant": units["variant"],
                    "period": data["assignments"]["period"],
                    "assigned_at": units["exposed_at"].dt.to_pydatetime(),
                }
            )
            conn.execute(sa.insert(schema.experiment_assignments), _records(assignments))
            conn.execute(
                sa.insert(schema.experiment_periods),
                [
                    {
                        "playbook": "bench",
                        "experiment": "bench",
                        "period": p,
                        "weights": __import__("json").dumps(w),
                        "recorded_at": START,
                    }
                    for p, w in data["period_weights"].items()
                ],
            )
        outcomes = data["outcomes"]
        t = time.perf_counter()
        update_experiment(playbook=book, ledger=led, outcomes=outcomes)
        elapsed = time.perf_counter() - t
        led.dispose()
    return elapsed


def report(result: dict[str, Any]) -> list[str]:
    """Human-readable lines for a result of :func:`run`."""
    lines = [
        f"analyse_experiment: {result['units']:,} assignments + {result['holdout_units']:,} "
        f"held out, {result['outcome_rows']:,} outcome rows: median "
        f"{result['analysis_median']:.3f} s of {result['repeats']} "
        f"({', '.join(f'{t:.3f}' for t in result['analysis_seconds'])})",
        f"baseline (rate per variant by hand: merge, window, group): median "
        f"{result['baseline_median']:.3f} s -> analysis is {result['ratio']:.2f}x the baseline; "
        f"rates agree: {result['agree']}",
        f"  the first call, which imports scipy.stats (lazily, on first use): "
        f"{result['analysis_seconds'][0]:.3f} s",
        f"  rates {result['rates']}; P(best) {result['probability_best']}; SRM p "
        f"{result['srm_p_value']:.3g}; outcomes before exposure "
        f"{result['outcomes_before_exposure']:,}",
    ]
    if "ledger_seconds" in result:
        lines.append(
            f"update_experiment from a SQLite ledger (store the outcomes, read exposures, "
            f"assignments, outcomes; analyse; write): {result['ledger_seconds']:.2f} s"
        )
    lines.append(f"  other load during the run: {result['other_load']:.2f} cores")
    return lines


def checks(result: dict[str, Any]) -> list[Check]:
    """The analysis target."""
    return [
        Check(
            f"analysing {result['units']:,} assignments with outcomes (median)",
            f"{result['analysis_median']:.3f} s",
            f"<= {TARGET_SECONDS} s",
            result["analysis_median"] <= TARGET_SECONDS and result["agree"],
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the analysis benchmark alone; exit code 1 if the target is missed."""
    parser = argparse.ArgumentParser(description="analysis of 1,000,000 assignments")
    parser.add_argument("--units", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ledger", action="store_true", help="also time the ledger path")
    args = parser.parse_args(argv)
    result = run(units=args.units, repeats=args.repeats, ledger=args.ledger)
    return finish(report(result), checks(result))


if __name__ == "__main__":
    raise SystemExit(main())
