"""The churn playbook's execution layer: the library's factory wired to the reference deployment.

:func:`build_churn_execution_defs` is the whole integration: the insight (``churn_scores``), the
playbook YAML, the channels and the ledger go into
:func:`autoexec_dagster.dagster.defs_factory.build_execution_defs`, which returns the execution
assets ``churn_outreach/plan``, ``churn_outreach/actions`` and ``churn_outreach/escalations``, the
blocking checks on ``churn_scores``, the job ``churn_outreach_execution_job`` and the sensor
``churn_outreach_sensor``. With the outcomes (``churn_outcomes``) it also returns
``churn_outreach/experiment`` (the retention_offer experiment updated with each outcome
partition), ``churn_outreach/learnings``, ``churn_outreach/uplift`` (each action against the
holdout), the job ``churn_outreach_outcomes_job`` and the sensor ``churn_outreach_outcomes_sensor``,
which runs that job for each new ``churn_outcomes`` partition.

The sensor is STOPPED unless ``AUTOEXEC_SENSOR_STATUS=running``: switching it on makes every new
``churn_scores`` partition send emails and create CRM tasks, which should be a decision. Its
interval is ``AUTOEXEC_SENSOR_INTERVAL_SECONDS`` (default 30; the end-to-end tests use 5); see
:mod:`sensors.settings`.
"""

from collections.abc import Mapping

import dagster as dg

from assets import churn_outcomes, churn_scores
from autoexec_dagster import ActionLedger, Channel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from resources import CHURN_PLAYBOOK_PATH
from resources.channels import churn_channels, default_ledger_url
from sensors.settings import (
    SENSOR_INTERVAL_ENV,
    SENSOR_STATUS_ENV,
    sensor_interval_from_env,
    sensor_status_from_env,
)

__all__ = [
    "SENSOR_INTERVAL_ENV",
    "SENSOR_STATUS_ENV",
    "build_churn_execution_defs",
    "sensor_interval_from_env",
    "sensor_status_from_env",
]

# churn_scores records how many customers score at or above the flag threshold (0.5) under this
# key. Every rule of the churn playbook requires churn_score >= 0.5, so that count is exactly the
# number the playbook flags, and the sensor decides without loading 20,000 rows per partition.
FLAGGED_METADATA_KEY = "flagged"


def build_churn_execution_defs(
    *,
    channels: Mapping[str, Channel] | None = None,
    ledger: ActionLedger | str | None = None,
    sensor_status: dg.DefaultSensorStatus | None = None,
    minimum_interval_seconds: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dg.Definitions:
    """The execution layer of the churn playbook over ``churn_scores``.

    Every argument left as None is read from the environment (see :mod:`resources.channels`
    and this module's docstring), which is what ``definitions.py`` does; the demo passes the
    channels of the receivers it has just started.

    Args:
        channels: Channel per playbook action (``retention_email``, ``crm_task``).
        ledger: The action ledger or its URL.
        sensor_status: Whether the sensor runs without being switched on in the UI.
        minimum_interval_seconds: Least time between two sensor ticks.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        Definitions to merge with the churn assets.

    Raises:
        ValueError: An environment variable holds an invalid value.
    """
    return build_execution_defs(
        insight=churn_scores,
        playbook=CHURN_PLAYBOOK_PATH,
        channels=channels if channels is not None else churn_channels(environ=environ),
        ledger=ledger if ledger is not None else default_ledger_url(environ),
        sensor_default_status=sensor_status or sensor_status_from_env(environ),
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval_from_env(environ),
        flagged_metadata_key=FLAGGED_METADATA_KEY,
        outcomes=churn_outcomes,
    )
