"""JSON for what the ledger keeps of a request (its entity data) and of a reply (its output).

The outbox holds each pending action's request data, so a worker can send it from the ledger alone
(after a crash, or from a later run). Values keep their types across the round trip where JSON has
none: datetimes, dates, durations and decimals are tagged; NaN and NaT become null, as they would
when bound to SQL.
"""

import datetime as dt
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

_TAG = "$autoexec"
MAX_OUTPUT_BYTES = 16_384


def _tagged(value: Any) -> Any:
    """What JSON cannot say by itself (json.dumps calls this only for such values)."""
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, pd.Timedelta):
        value = value.to_pytimedelta()
    if isinstance(value, dt.datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, dt.date):
        return {_TAG: "date", "v": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {_TAG: "timedelta", "v": value.total_seconds()}
    if isinstance(value, Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, np.ndarray | set | frozenset):
        return list(value)
    return str(value)


def _revive(obj: dict[str, Any]) -> Any:
    kind = obj.get(_TAG)
    if kind is None:
        return obj
    value = obj["v"]
    if kind == "datetime":
        return dt.datetime.fromisoformat(value)
    if kind == "date":
        return dt.date.fromisoformat(value)
    if kind == "timedelta":
        return dt.timedelta(seconds=value)
    if kind == "decimal":
        return Decimal(value)
    return obj


def dumps_value(value: Any) -> str:
    """Encode any JSON-able value (a list of log entries, say) the way :func:`dumps` does."""
    return json.dumps(value, default=_tagged, separators=(",", ":"))


def loads_value(text: str | None, default: Any = None) -> Any:
    """Decode what :func:`dumps_value` wrote; ``default`` for None or empty text."""
    if not text:
        return default
    return json.loads(text, object_hook=_revive) if _TAG in text else json.loads(text)


def dumps(data: Mapping[str, Any]) -> str:
    """Encode a mapping of plan values as JSON text (NaN stays NaN, as Python's json reads it)."""
    return json.dumps(data, default=_tagged, separators=(",", ":"))


def loads(text: str | None) -> dict[str, Any]:
    """Decode what :func:`dumps` wrote; None or empty text is an empty mapping."""
    if not text:
        return {}
    if _TAG not in text:
        return json.loads(text)  # nothing tagged: skip the per-object hook
    return json.loads(text, object_hook=_revive)


def bounded_output(output: Mapping[str, Any] | None) -> str | None:
    """A reply's output as JSON, or a marker when it exceeds :data:`MAX_OUTPUT_BYTES`.

    Later workflow steps read outputs; an unbounded reply would grow the ledger without limit.
    """
    if output is None:
        return None
    text = dumps(output)
    if len(text.encode()) <= MAX_OUTPUT_BYTES:
        return text
    return dumps({"_truncated": True, "bytes": len(text.encode()), "keys": sorted(output)[:50]})
