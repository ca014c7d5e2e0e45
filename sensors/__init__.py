"""Sensors and schedules of the reference deployment.

- :mod:`sensors.churn_execution`: the churn playbook's execution layer (execution assets, checks,
  job and the sensor that answers each new ``churn_scores`` partition).
- :mod:`sensors.churn_scoring`: the daily job and schedule that produce ``churn_scores``.
"""

from sensors.churn_execution import (
    SENSOR_INTERVAL_ENV,
    SENSOR_STATUS_ENV,
    build_churn_execution_defs,
    sensor_interval_from_env,
    sensor_status_from_env,
)
from sensors.churn_scoring import churn_scoring_job, churn_scoring_schedule

__all__ = [
    "SENSOR_INTERVAL_ENV",
    "SENSOR_STATUS_ENV",
    "build_churn_execution_defs",
    "churn_scoring_job",
    "churn_scoring_schedule",
    "sensor_interval_from_env",
    "sensor_status_from_env",
]
