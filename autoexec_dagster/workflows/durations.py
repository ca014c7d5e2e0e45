"""Durations as playbooks write them: ``30s``, ``10m``, ``6h``, ``2d`` (or a number of seconds)."""

import math
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
# A century: longer waits are a typo, and overflow datetime arithmetic near the year 9999.
MAX_SECONDS = 100 * 365 * 86_400


def parse_duration(value: Any, *, what: str = "duration") -> timedelta:
    """Read a duration: ``"30s"``, ``"10m"``, ``"6h"``, ``"2d"``, ``"1w"``, seconds, or a timedelta.

    Raises:
        ValueError: The value is not a duration, is not positive, or exceeds a century. The
            message names ``what`` and the units accepted.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a duration")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(
                f"{what}: {value!r} is not a duration; write a number and a unit, e.g. 30s, 10m, "
                "6h, 2d (units: ms, s, m, h, d, w)"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"{what}: {value!r} is not a duration")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what}: {value!r} must be a positive duration")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{what}: {value!r} is longer than a century")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact playbook spelling of a duration (``600 s`` -> ``10m``)."""
    seconds = value.total_seconds()
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


# Written as text ("30s") or a timedelta; always a timedelta once validated (see as_timedelta).
Duration = Annotated[
    timedelta | str | float,
    BeforeValidator(lambda v: parse_duration(v)),
    PlainSerializer(lambda v: format_duration(as_timedelta(v)), return_type=str),
]


def as_timedelta(value: "timedelta | str | float") -> timedelta:
    """A validated :data:`Duration` field as the timedelta it holds."""
    return value if isinstance(value, timedelta) else parse_duration(value)
