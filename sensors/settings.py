"""Settings every story's sensors share, read from the environment.

The execution sensors of all stories start STOPPED unless ``AUTOEXEC_SENSOR_STATUS=running``:
switching one on makes new insight partitions act on real destinations, which should be a
decision. Their interval is ``AUTOEXEC_SENSOR_INTERVAL_SECONDS`` (default 30; the end-to-end
tests use 5). One switch for the whole deployment, so a test or an operator cannot start one
story's side effects while believing they are all off.
"""

import os
from collections.abc import Mapping

import dagster as dg

SENSOR_STATUS_ENV = "AUTOEXEC_SENSOR_STATUS"
SENSOR_INTERVAL_ENV = "AUTOEXEC_SENSOR_INTERVAL_SECONDS"
DEFAULT_SENSOR_INTERVAL_SECONDS = 30
_STATUSES = {
    "running": dg.DefaultSensorStatus.RUNNING,
    "stopped": dg.DefaultSensorStatus.STOPPED,
}


def sensor_status_from_env(environ: Mapping[str, str] | None = None) -> dg.DefaultSensorStatus:
    """The sensor's default status from ``$AUTOEXEC_SENSOR_STATUS`` (``running`` or ``stopped``).

    Args:
        environ: Environment to read; the process environment when None.

    Returns:
        STOPPED when the variable is unset or empty.

    Raises:
        ValueError: The variable holds anything else; a typo must not silently leave a
            deployment that should act doing nothing (or the reverse).
    """
    raw = (os.environ if environ is None else environ).get(SENSOR_STATUS_ENV, "").strip().lower()
    if not raw:
        return dg.DefaultSensorStatus.STOPPED
    try:
        return _STATUSES[raw]
    except KeyError:
        raise ValueError(
            f"{SENSOR_STATUS_ENV} must be 'running' or 'stopped', got {raw!r}"
        ) from None


def sensor_interval_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The least time between two sensor ticks, from ``$AUTOEXEC_SENSOR_INTERVAL_SECONDS``.

    Args:
        environ: Environment to read; the process environment when None.

    Returns:
        Seconds, 30 when the variable is unset or empty.

    Raises:
        ValueError: The variable is not a positive whole number.
    """
    raw = (os.environ if environ is None else environ).get(SENSOR_INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_SENSOR_INTERVAL_SECONDS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{SENSOR_INTERVAL_ENV} must be a whole number >= 1, got {raw!r}")
    return int(raw)
