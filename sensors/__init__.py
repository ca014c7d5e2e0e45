"""Sensors and schedules of the reference deployment, one pair of modules per story.

- :mod:`sensors.churn_execution`: the churn playbook's execution layer (execution assets, checks,
  job and the sensor that answers each new ``churn_scores`` partition).
- :mod:`sensors.churn_scoring`: the daily jobs and schedules that produce ``churn_scores`` and
  observe ``churn_outcomes``.
- :mod:`sensors.host_remediation`: the host-remediation playbook's execution layer over
  ``host_anomalies`` (the same, plus the sensor that advances waiting workflows).
- :mod:`sensors.host_scoring`: the hourly job and schedule that produce ``host_anomalies``.
- :mod:`sensors.stock_replenishment`: the stock-replenishment playbook's execution layer over
  ``stock_shortages`` (with the workflows sensor that follows up orders and applies approvals).
- :mod:`sensors.stock_scoring`: the daily job and schedule that produce ``stock_shortages``.
- :mod:`sensors.campaigns`: the campaign-optimisation playbook's execution layer over
  ``campaign_sends``, with the experiment updated from ``campaign_outcomes``, and the daily jobs
  that produce both.
- :mod:`sensors.settings`: the sensors' status and interval, shared by every story.
"""

from sensors.campaigns import (
    build_campaign_execution_defs,
    campaign_day_job,
    campaign_tracking_job,
)
from sensors.churn_execution import build_churn_execution_defs
from sensors.churn_scoring import (
    churn_outcomes_job,
    churn_outcomes_schedule,
    churn_scoring_job,
    churn_scoring_schedule,
)
from sensors.host_remediation import build_host_remediation_execution_defs
from sensors.host_scoring import host_scoring_job, host_scoring_schedule
from sensors.settings import (
    SENSOR_INTERVAL_ENV,
    SENSOR_STATUS_ENV,
    sensor_interval_from_env,
    sensor_status_from_env,
)
from sensors.stock_replenishment import build_stock_replenishment_execution_defs
from sensors.stock_scoring import stock_scoring_job, stock_scoring_schedule

__all__ = [
    "SENSOR_INTERVAL_ENV",
    "SENSOR_STATUS_ENV",
    "build_campaign_execution_defs",
    "build_churn_execution_defs",
    "build_host_remediation_execution_defs",
    "build_stock_replenishment_execution_defs",
    "campaign_day_job",
    "campaign_tracking_job",
    "churn_outcomes_job",
    "churn_outcomes_schedule",
    "churn_scoring_job",
    "churn_scoring_schedule",
    "host_scoring_job",
    "host_scoring_schedule",
    "sensor_interval_from_env",
    "sensor_status_from_env",
    "stock_scoring_job",
    "stock_scoring_schedule",
]
