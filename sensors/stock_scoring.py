"""The daily scoring job and its schedule: how new stock shortages arrive in the deployment.

``stock_scoring_job`` materializes one ``stock_shortages`` partition: the morning's stock of every
SKU against the trained ``demand_forecast_model``'s forecast over its lead time (train it once
first). Selecting ``stock_shortages`` also selects the execution layer's checks on it, so a day
whose shortages cannot be acted on is marked failed in the run that produced it.
``stock_scoring_schedule`` runs it early every morning for the day that has just ended (the day's
sales must be in); it is STOPPED by default, and once it is switched on, the execution sensor
(when running) answers each new day with one execution run.
"""

import dagster as dg

from assets import stock_shortages

stock_scoring_job = dg.define_asset_job(
    name="stock_scoring_job",
    selection=dg.AssetSelection.assets(stock_shortages),
    description="Forecast every SKU's demand over its lead time and find the day's shortages.",
)

stock_scoring_schedule = dg.build_schedule_from_partitioned_job(
    stock_scoring_job,
    name="stock_scoring_schedule",
    hour_of_day=5,
    minute_of_hour=30,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every morning at 05:30, find the shortages of the day that has just ended.",
)
