"""Uplift: did the action work at all? Treated entities against the holdout, on the outcome.

For every action with exposures (an experiment's action, or every action of a playbook with an
``outcome`` metric), the treated entities (whatever variant they got) are compared with the held-out
ones on the outcome within the window: per partition, and cumulative over all partitions (each
entity's first exposure). The verdict says whether, with enough data on both sides, the action
shows an effect, no detectable effect, or harm.
"""

import math

import numpy as np
import pandas as pd

from autoexec_dagster.experiments.outcomes import is_binary, join_window
from autoexec_dagster.experiments.statistics import difference_interval, relative_lift_interval
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import HOLDOUT
from autoexec_dagster.playbook import Playbook

ALL_PARTITIONS = "(all)"
UPLIFT_COLUMNS: tuple[str, ...] = (
    "action",
    "partition_key",
    "metric",
    "treated_n",
    "treated_rate",
    "holdout_n",
    "holdout_rate",
    "difference",
    "difference_low",
    "difference_high",
    "lift",
    "lift_low",
    "lift_high",
    "p_value",
    "verdict",
)
EFFECT = "effect"
NO_EFFECT = "no_effect"
HARM = "harm"
NOT_ENOUGH_DATA = "not_enough_data"


def outcome_spec(playbook: Playbook, action: str) -> tuple[str, float, int, bool] | None:
    """``(metric, window seconds, min samples, higher is better)`` an action is judged by: its
    experiment's, else the playbook's outcome metric; None when it has neither."""
    for rule in playbook.rules:
        if rule.action == action and rule.experiment is not None:
            spec = rule.experiment
            return spec.metric, spec.window_seconds, spec.min_samples_per_variant, True
    if playbook.outcome is not None:
        out = playbook.outcome
        return out.metric, out.window_seconds, out.min_samples, out.higher_is_better
    return None


def _row(
    action: str,
    partition: str,
    metric: str,
    treated: np.ndarray,
    held: np.ndarray,
    *,
    min_samples: int,
    higher_is_better: bool,
) -> dict[str, object]:
    t_n, h_n = int(treated.size), int(held.size)
    t_mean = float(treated.mean()) if t_n else math.nan
    h_mean = float(held.mean()) if h_n else math.nan
    t_var = float(treated.var(ddof=1)) if t_n > 1 else math.nan
    h_var = float(held.var(ddof=1)) if h_n > 1 else math.nan
    diff = difference_interval(t_mean, t_var, t_n, h_mean, h_var, h_n)
    lift = relative_lift_interval(t_mean, t_var, t_n, h_mean, h_var, h_n)
    if t_n < min_samples or h_n < min_samples or not math.isfinite(diff.low):
        verdict = NOT_ENOUGH_DATA
    else:
        better = diff.low > 0 if higher_is_better else diff.high < 0
        worse = diff.high < 0 if higher_is_better else diff.low > 0
        verdict = EFFECT if better else HARM if worse else NO_EFFECT
    return {
        "action": action,
        "partition_key": partition,
        "metric": metric,
        "treated_n": t_n,
        "treated_rate": t_mean,
        "holdout_n": h_n,
        "holdout_rate": h_mean,
        "difference": diff.estimate,
        "difference_low": diff.low,
        "difference_high": diff.high,
        "lift": lift.estimate,
        "lift_low": lift.low,
        "lift_high": lift.high,
        "p_value": diff.p_value,
        "verdict": verdict,
    }


def uplift(
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    partition_key: str | None = None,
) -> pd.DataFrame:
    """Treated against held out, per action: per partition and cumulative (``(all)``).

    Reads the exposures and the outcomes stored in the ledger (outcomes are stored by
    :func:`~autoexec_dagster.update_experiment` or :func:`store_playbook_outcomes`).

    Args:
        playbook: The playbook.
        ledger: The action ledger.
        partition_key: Only this partition (plus the cumulative row); None for every partition.

    Returns:
        One row per action and partition (:data:`UPLIFT_COLUMNS`); ``lift`` is relative, the
        ``difference`` absolute, both with 95% intervals; ``verdict`` is ``effect``,
        ``no_effect``, ``harm`` or ``not_enough_data``.
    """
    rows: list[dict[str, object]] = []
    exposures = ledger.exposures_frame(playbook.name)
    for action in sorted(exposures["action"].unique()) if len(exposures) else []:
        spec = outcome_spec(playbook, str(action))
        if spec is None:
            continue
        metric, window, min_samples, higher = spec
        mine = exposures[exposures["action"] == action]
        outcomes = ledger.outcomes_frame(playbook.name, [metric])
        binary = {metric: is_binary(outcomes[metric]) if len(outcomes) else True}
        groups: list[tuple[str, pd.DataFrame]] = []
        partitions = sorted(mine["partition_key"].unique())
        if partition_key is not None:
            partitions = [p for p in partitions if p == partition_key]
        for partition in partitions:
            groups.append((str(partition), mine[mine["partition_key"] == partition]))
        first = mine.sort_values("exposed_at", kind="stable").drop_duplicates(
            ["entity_id"], keep="first"
        )
        groups.append((ALL_PARTITIONS, first))
        for partition, units in groups:
            joined, _before = join_window(
                units[["entity_id", "exposed_at", "arm"]],
                outcomes,
                metrics=[metric],
                window_seconds=window,
                binary=binary,
            )
            held = joined["arm"] == HOLDOUT
            values = joined[metric].to_numpy(dtype=float)
            rows.append(
                _row(
                    str(action),
                    partition,
                    metric,
                    values[~held.to_numpy()],
                    values[held.to_numpy()],
                    min_samples=min_samples,
                    higher_is_better=higher,
                )
            )
    return pd.DataFrame(rows, columns=list(UPLIFT_COLUMNS))
