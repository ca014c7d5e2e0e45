"""Transform steps: a pure function over every instance that reaches the step together.

The function gets one DataFrame (``instance_id``, the insight columns, earlier outputs as
``<step>.<field>``) and returns one: an ``instance_id`` column and the step's output columns (the
columns it adds). It may give up on an instance (no row, or a row with only a ``reason``): the
step then fails for that instance, with the reason, and the workflow escalates it. It may not
invent instances, repeat one, or lose the ``instance_id`` column: those are programming errors,
refused before any instance moves, so the fixed function runs again over the same instances.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from autoexec_dagster.errors import PlanError
from autoexec_dagster.ledger import payload
from autoexec_dagster.workflows.workflow import INSTANCE_COLUMN, Step

# A row's ``reason`` column, when the function returns one, explains an instance it gave up on.
REASON_COLUMN = "reason"


@dataclass(frozen=True)
class TransformResult:
    """What a transform decided per instance.

    Attributes:
        outputs: instance id -> the step's output (the returned row's new columns).
        dropped: instance id -> why the step fails for it (the function returned no row, or a
            row whose ``reason`` is set and whose other output columns are all empty).
    """

    outputs: dict[str, dict[str, Any]]
    dropped: dict[str, str]


def run_transform(step: Step, frame: pd.DataFrame) -> TransformResult:
    """Call a transform step's function over the instances' frame and check what it returned.

    Args:
        step: A step whose ``kind`` is ``transform``.
        frame: One row per instance, with :data:`INSTANCE_COLUMN`.

    Returns:
        The per-instance outputs and the instances it dropped.

    Raises:
        PlanError: The function raised, or returned something other than a DataFrame, a frame
            without the ``instance_id`` column, repeated instances, or instances it was not given.
    """
    fn = step.transform_fn
    name = getattr(fn, "__qualname__", repr(fn))
    where = f"step {step.name!r}: transform {name}"
    given = frame[INSTANCE_COLUMN].astype(str).tolist()
    try:
        result = fn(frame.copy())
    except Exception as exc:
        raise PlanError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, pd.DataFrame):
        raise PlanError(f"{where} returned {type(result).__name__}, not a pandas DataFrame")
    if INSTANCE_COLUMN not in result.columns:
        raise PlanError(
            f"{where} returned a frame without the {INSTANCE_COLUMN!r} column (it has "
            f"{sorted(map(str, result.columns))}); keep it so each row names its instance"
        )
    returned = result[INSTANCE_COLUMN].astype(str)
    repeated = sorted(set(returned[returned.duplicated()]))
    if repeated:
        raise PlanError(
            f"{where} returned {len(repeated)} instance(s) more than once, e.g. {repeated[:3]}; "
            "return at most one row per instance"
        )
    unknown = sorted(set(returned) - set(given))
    if unknown:
        raise PlanError(
            f"{where} returned {len(unknown)} instance(s) it was not given, e.g. {unknown[:3]}; "
            "a transform may only decide about the rows it receives"
        )
    inputs = set(map(str, frame.columns))
    new_columns = [c for c in map(str, result.columns) if c not in inputs]
    outputs: dict[str, dict[str, Any]] = {}
    dropped: dict[str, str] = {}
    for record in result.to_dict("records"):
        instance_id = str(record[INSTANCE_COLUMN])
        output = {c: _plain(record[c]) for c in new_columns}
        reason = output.get(REASON_COLUMN)
        others = [v for c, v in output.items() if c != REASON_COLUMN]
        if reason and all(v is None for v in others):
            dropped[instance_id] = f"step {step.name!r}: {reason}"
            continue
        outputs[instance_id] = output
    for instance_id in given:
        if instance_id not in outputs and instance_id not in dropped:
            dropped[instance_id] = f"step {step.name!r}: the transform returned no row for it"
    return TransformResult(outputs=outputs, dropped=dropped)


def transform_frame(rows: Sequence[Mapping[str, Any]], instance_ids: Sequence[str]) -> pd.DataFrame:
    """The frame a transform gets: each instance's columns plus its id."""
    frame = pd.DataFrame(list(rows))
    frame.insert(0, INSTANCE_COLUMN, list(instance_ids))
    return frame


def _plain(value: Any) -> Any:
    """A value as the output stores it: NaN as null, numpy scalars unboxed, the rest JSON-able."""
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        if value is pd.NA or value is pd.NaT:
            return None
    except TypeError:
        pass
    return payload.loads_value(payload.dumps_value(value))
