"""Definitions the workflow daemon test loads in ``dagster-daemon`` (and its run workers).

A small host insight (one static partition, four flagged hosts) and a playbook whose workflow
diagnoses each host and then polls its health every 2 s (for at most 60 s) until it is healthy.
The health check turns healthy on the third poll: the step attempt travels with each request, so
the answer is the same in whichever run worker process makes it. The ledger is the deployment's
default (``$AUTOEXEC_LEDGER_URL``), and both sensors run with a 1 s interval.
"""

from typing import Any

import dagster as dg
import pandas as pd

from autoexec_dagster import Playbook, PythonChannel, Rule, Step, Workflow
from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.dagster.insight_sensor import flagged_metadata
from autoexec_dagster.playbook import Guardrails

PARTITION = "2026-12-01T10:00"
HOSTS = 4
HEALTHY_FROM_ATTEMPT = 3

playbook = Playbook(
    name="daemon_hosts",
    entity_key="host_id",
    rules=[Rule(name="anomalous", when="anomaly_score >= 0.8", workflow="remediate")],
    workflows={
        "remediate": Workflow(
            steps=[
                Step(name="diagnose", action="run_diagnostics"),
                Step(
                    name="verify",
                    action="host_health",
                    until="`verify.status` == 'healthy'",
                    every="2s",
                    timeout="60s",
                ),
            ],
            on_failure="The host did not recover",
        )
    },
    guardrails=Guardrails(max_flagged_fraction=1.0),
)


def run_diagnostics(request: ActionRequest) -> dict[str, Any]:
    return {"cause": "service_hung"}


def host_health(request: ActionRequest) -> dict[str, Any]:
    healthy = int(request.data["attempt"]) >= HEALTHY_FROM_ATTEMPT
    return {"status": "healthy" if healthy else "degraded", "poll": int(request.data["attempt"])}


def hosts_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "host_id": [f"web-{i:02d}" for i in range(HOSTS + 2)],
            "anomaly_score": [0.9] * HOSTS + [0.1, 0.2],
        }
    )


@dg.asset(partitions_def=dg.StaticPartitionsDefinition([PARTITION]))
def daemon_host_anomalies() -> dg.Output[pd.DataFrame]:
    """Anomaly scores of the hosts (four flagged)."""
    frame = hosts_frame()
    return dg.Output(frame, metadata=flagged_metadata(frame, playbook))


defs = dg.Definitions.merge(
    dg.Definitions(assets=[daemon_host_anomalies]),
    build_execution_defs(
        insight=daemon_host_anomalies,
        playbook=playbook,
        channels={
            "run_diagnostics": PythonChannel.from_callable(run_diagnostics),
            "host_health": PythonChannel.from_callable(host_health),
        },
        sensor_default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=1,
        workflow_sensor_interval_seconds=1,
    ),
)
