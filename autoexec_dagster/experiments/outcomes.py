"""Outcomes: checked, stored, and joined to exposures within a window.

An outcome table holds one row per entity and time, with metric columns: 0/1 (retained, clicked)
or numeric (revenue). A unit (an entity's first exposure to an action, or one exposure per
partition) gets, per metric, the outcomes that occurred within the window after its exposure:
the maximum for a 0/1 metric (converted at least once), the sum for a numeric one. Outcomes
before the exposure are ignored and counted; units without outcomes in the window count as 0.
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd

from autoexec_dagster.errors import ExperimentError

OCCURRED_AT = "occurred_at"


def check_outcomes(
    outcomes: pd.DataFrame, *, entity_key: str, metrics: Sequence[str], what: str
) -> pd.DataFrame:
    """Validate an outcome table and return it as entity_id, occurred_at (UTC) and the metrics.

    Raises:
        ExperimentError: It is not a DataFrame; it lacks the entity column, ``occurred_at`` or a
            metric; a metric is not numeric or holds NaN; a time does not parse; or rows repeat
            on (entity, time). The message names the column and example entities.
    """
    if not isinstance(outcomes, pd.DataFrame):
        raise ExperimentError(
            f"{what}: outcomes must be a pandas DataFrame, got {type(outcomes).__name__}"
        )
    key = entity_key if entity_key in outcomes.columns else "entity_id"
    needed = [key, OCCURRED_AT, *metrics]
    missing = [c for c in dict.fromkeys(needed) if c not in outcomes.columns]
    if missing:
        raise ExperimentError(
            f"{what}: the outcomes lack column(s) {missing} (the entity key {entity_key!r}, "
            f"{OCCURRED_AT!r} and the metrics {list(metrics)}); they have "
            f"{sorted(map(str, outcomes.columns))}"
        )
    ids = outcomes[key]
    if ids.isna().any():
        raise ExperimentError(f"{what}: {int(ids.isna().sum())} outcome row(s) have no {key!r}")
    for metric in metrics:
        values = outcomes[metric]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            if pd.api.types.is_bool_dtype(values):
                continue
            raise ExperimentError(
                f"{what}: metric {metric!r} must be numeric (0/1 or a number), but the outcomes "
                f"hold dtype {values.dtype}, e.g. {values.head(3).tolist()}"
            )
        nan = values.isna().to_numpy()
        if nan.any():
            raise ExperimentError(
                f"{what}: metric {metric!r} holds {int(nan.sum())} missing value(s), e.g. for "
                f"{key} {ids[nan].astype(str).head(5).tolist()}; leave a row out rather than "
                "writing NaN"
            )
        if not np.isfinite(values.to_numpy(dtype=float)).all():
            raise ExperimentError(f"{what}: metric {metric!r} holds infinite values")
    try:
        occurred = pd.to_datetime(outcomes[OCCURRED_AT], utc=True)
    except (ValueError, TypeError) as exc:
        raise ExperimentError(
            f"{what}: {OCCURRED_AT!r} holds a value that is not a time: {exc}"
        ) from None
    if occurred.isna().any():
        raise ExperimentError(
            f"{what}: {int(occurred.isna().sum())} outcome row(s) have no {OCCURRED_AT!r}"
        )
    frame = pd.DataFrame(
        {
            "entity_id": ids.astype(str).to_numpy(),
            OCCURRED_AT: occurred.to_numpy(),
            **{m: outcomes[m].astype(float).to_numpy() for m in metrics},
        }
    )
    frame[OCCURRED_AT] = pd.to_datetime(frame[OCCURRED_AT], utc=True)
    repeated = frame.duplicated(["entity_id", OCCURRED_AT], keep=False).to_numpy()
    if repeated.any():
        examples = frame.loc[repeated, ["entity_id", OCCURRED_AT]].head(3)
        raise ExperimentError(
            f"{what}: {int(repeated.sum())} outcome rows repeat on (entity, {OCCURRED_AT}), e.g. "
            f"{[(e, str(t)) for e, t in examples.itertuples(index=False)]}; one row per entity "
            "and time, with every metric as a column"
        )
    return frame


def to_long(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """entity_id, occurred_at, metric, value: the form the ledger stores."""
    return frame.melt(
        id_vars=["entity_id", OCCURRED_AT], value_vars=list(metrics), var_name="metric"
    )


def is_binary(values: pd.Series | np.ndarray) -> bool:
    """Whether a metric only ever takes 0 or 1 (then it is a conversion)."""
    array = np.asarray(values, dtype=float)
    return bool(np.isin(array, (0.0, 1.0)).all())


def join_window(
    units: pd.DataFrame,
    outcomes: pd.DataFrame,
    *,
    metrics: Sequence[str],
    window_seconds: float,
    binary: dict[str, bool] | None = None,
) -> tuple[pd.DataFrame, int]:
    """Each unit's outcome per metric within the window after its exposure.

    Args:
        units: One row per unit with ``entity_id`` and ``exposed_at`` (UTC); other columns kept.
        outcomes: entity_id, occurred_at and the metric columns (see :func:`check_outcomes`).
        metrics: The metrics to aggregate.
        window_seconds: The window's length.
        binary: Metric -> whether it is 0/1 (taken from the values when left out).

    Returns:
        ``(units with one column per metric, outcomes before an exposure)``.
    """
    out = units.reset_index(drop=True).copy()
    kinds = binary or {m: is_binary(outcomes[m]) if len(outcomes) else True for m in metrics}
    for metric in metrics:
        out[metric] = 0.0
    if out.empty or outcomes.empty:
        return out, 0
    unit_ids = pd.Index(out["entity_id"].astype(str))
    codes = unit_ids.get_indexer(pd.Index(outcomes["entity_id"].astype(str)))
    if not unit_ids.is_unique:
        # Several units per entity (one per partition): a merge pairs each outcome with each.
        return _join_by_merge(out, outcomes, metrics, window_seconds, kinds)
    known = codes >= 0
    unit_rows = codes[known]
    exposed = out["exposed_at"].to_numpy(dtype="datetime64[ns]")
    occurred = outcomes[OCCURRED_AT].to_numpy(dtype="datetime64[ns]")[known]
    delta = (occurred - exposed[unit_rows]) / np.timedelta64(1, "s")
    before = delta < 0
    inside = (~before) & (delta < window_seconds)
    rows = unit_rows[inside]
    for metric in metrics:
        values = outcomes[metric].to_numpy(dtype=float)[known][inside]
        target = np.zeros(len(out))
        if kinds[metric]:
            np.maximum.at(target, rows, values)
        else:
            np.add.at(target, rows, values)
        out[metric] = target
    return out, int(before.sum())


def _join_by_merge(
    out: pd.DataFrame,
    outcomes: pd.DataFrame,
    metrics: Sequence[str],
    window_seconds: float,
    kinds: dict[str, bool],
) -> tuple[pd.DataFrame, int]:
    out = out.assign(_unit=np.arange(len(out)))
    pairs = out[["_unit", "entity_id", "exposed_at"]].merge(outcomes, on="entity_id", how="inner")
    delta = (pairs[OCCURRED_AT] - pairs["exposed_at"]).dt.total_seconds().to_numpy()
    before = delta < 0
    inside = (~before) & (delta < window_seconds)
    rows = pairs["_unit"].to_numpy()[inside]
    for metric in metrics:
        values = pairs[metric].to_numpy(dtype=float)[inside]
        target = np.zeros(len(out))
        if kinds[metric]:
            np.maximum.at(target, rows, values)
        else:
            np.add.at(target, rows, values)
        out[metric] = target
    # An outcome is "before the action" only when it precedes every exposure of its entity.
    first = out.groupby("entity_id")["exposed_at"].min()
    matched = outcomes[outcomes["entity_id"].isin(first.index)]
    early = int((matched[OCCURRED_AT] < matched["entity_id"].map(first)).sum())
    return out.drop(columns="_unit"), early
