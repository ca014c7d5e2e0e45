"""The daily scoring job and its schedule: how new model output arrives in the deployment.

``churn_scoring_job`` materializes one ``churn_scores`` partition with the trained ``churn_model``
(train it once first). Selecting ``churn_scores`` also selects the asset checks the execution
layer defines on it, so a day whose scores cannot be acted on is marked failed in the same run
that produced it. ``churn_scoring_schedule`` runs the job every morning for the day that has just
ended; it is STOPPED by default, and once it is switched on, the execution sensor (when running)
answers each new partition with one execution run.

``churn_outcomes_job`` observes one day's outcomes (``churn_outcomes``: who was retained, among the
customers acted on or held out in the 14 days before); ``churn_outcomes_schedule`` runs it every
night for the day before, STOPPED by default like the scoring schedule. Each new outcome partition
is answered by ``churn_outreach_outcomes_sensor``, which updates the retention experiment and the
uplift against the holdout.
"""

import dagster as dg

from assets import churn_outcomes, churn_scores

churn_scoring_job = dg.define_asset_job(
    name="churn_scoring_job",
    selection=dg.AssetSelection.assets(churn_scores),
    description="Score every customer for one day with the trained churn model.",
)

churn_scoring_schedule = dg.build_schedule_from_partitioned_job(
    churn_scoring_job,
    name="churn_scoring_schedule",
    hour_of_day=6,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every morning, score the day that has just ended.",
)

churn_outcomes_job = dg.define_asset_job(
    name="churn_outcomes_job",
    selection=dg.AssetSelection.assets(churn_outcomes),
    description="Observe one day's outcomes of the customers acted on or held out.",
)

churn_outcomes_schedule = dg.build_schedule_from_partitioned_job(
    churn_outcomes_job,
    name="churn_outcomes_schedule",
    hour_of_day=23,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every night, observe the outcomes of the day before.",
)
