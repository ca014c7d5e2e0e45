"""The host-remediation playbook's execution layer: the library's factory over ``host_anomalies``.

:func:`build_host_remediation_execution_defs` is the whole integration, as for churn: the insight
(``host_anomalies``, hourly), the playbook YAML with its ``remediate`` workflow, one webhook
channel per step action and the ledger go into
:func:`autoexec_dagster.dagster.defs_factory.build_execution_defs`. It returns the execution
assets ``host_remediation/plan``, ``host_remediation/actions`` and
``host_remediation/escalations``, the blocking checks on ``host_anomalies``, the job
``host_remediation_execution_job``, the sensor ``host_remediation_sensor`` that answers each new
hour and the sensor that requests advance runs for partitions whose workflows have due work
(a poll interval passed). The execution run of an hour starts its workflows and takes each as far
as it can go now; later runs continue them, so no process waits for a host to recover.

The sensors are STOPPED unless ``AUTOEXEC_SENSOR_STATUS=running`` (see :mod:`sensors.settings`):
switching them on makes every new hour isolate and restart real hosts.
"""

from collections.abc import Mapping

import dagster as dg

from assets import host_anomalies
from autoexec_dagster import ActionLedger, Channel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from resources.channels import default_ledger_url
from resources.host_channels import HOST_REMEDIATION_PLAYBOOK_PATH, host_channels
from sensors.settings import sensor_interval_from_env, sensor_status_from_env

PLAYBOOK_NAME = "host_remediation"
# host_anomalies records how many hosts score at or above 0.8 under this key. Both rules of the
# playbook require anomaly_score >= 0.8, so the count is exactly what the playbook flags and the
# sensor decides without loading the fleet's 2,000 rows per hour.
FLAGGED_METADATA_KEY = "flagged"


def build_host_remediation_execution_defs(
    *,
    channels: Mapping[str, Channel] | None = None,
    ledger: ActionLedger | str | None = None,
    sensor_status: dg.DefaultSensorStatus | None = None,
    minimum_interval_seconds: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dg.Definitions:
    """The execution layer of the host-remediation playbook over ``host_anomalies``.

    Every argument left as None is read from the environment (see :mod:`resources.host_channels`
    and :mod:`sensors.settings`), which is what ``definitions.py`` does; the demo passes the
    channels of the infrastructure API it has just started and a ledger on its shared clock.

    Args:
        channels: Channel per step action (``isolate_host``, ``run_diagnostics``, ...).
        ledger: The action ledger or its URL; its clock decides when workflow work is due.
        sensor_status: Whether the sensors run without being switched on in the UI.
        minimum_interval_seconds: Least time between two sensor ticks.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        Definitions to merge with the host assets.

    Raises:
        ValueError: An environment variable holds an invalid value.
    """
    return build_execution_defs(
        insight=host_anomalies,
        playbook=HOST_REMEDIATION_PLAYBOOK_PATH,
        channels=channels if channels is not None else host_channels(environ=environ),
        ledger=ledger if ledger is not None else default_ledger_url(environ),
        sensor_default_status=sensor_status or sensor_status_from_env(environ),
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval_from_env(environ),
        flagged_metadata_key=FLAGGED_METADATA_KEY,
    )
