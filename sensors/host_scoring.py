"""The hourly scoring job and its schedule: how new host anomaly scores arrive in the deployment.

``host_scoring_job`` materializes one ``host_anomalies`` partition (one hour of the fleet's
metrics, scored by the trained ``host_anomaly_model``; train it once first). Selecting
``host_anomalies`` also selects the execution layer's checks on it, so an hour whose scores
cannot be acted on is marked failed in the run that produced it. ``host_scoring_schedule``
scores each hour a few minutes after it ends (the metrics of the hour's last minutes have to
land first); it is STOPPED by default, and once it is switched on, the execution sensor (when
running) answers each new hour with one execution run.
"""

import dagster as dg

from assets import host_anomalies

host_scoring_job = dg.define_asset_job(
    name="host_scoring_job",
    selection=dg.AssetSelection.assets(host_anomalies),
    description="Score every host for one hour with the trained anomaly model.",
)

host_scoring_schedule = dg.build_schedule_from_partitioned_job(
    host_scoring_job,
    name="host_scoring_schedule",
    minute_of_hour=5,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Five minutes past every hour, score the hour that has just ended.",
)
