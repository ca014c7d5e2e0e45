"""The reference deployment's Dagster definitions: every story's pipeline plus its execution layer.

- churn: ``raw_customers -> churn_model -> churn_scores`` (daily), acted on by the
  ``churn_outreach`` playbook (retention emails in an experiment, CRM tasks, escalations, a
  holdout), judged by ``churn_outcomes`` (observed nightly by ``churn_outcomes_schedule``);
- host remediation: ``host_metrics_history -> host_anomaly_model -> host_anomalies`` (hourly),
  acted on by the ``host_remediation`` playbook (isolate, diagnose, remediate, verify, reinstate
  as a durable workflow; database hosts and failed remedies to a person);
- stock replenishment: ``sales_history -> demand_forecast_model -> stock_shortages`` (daily),
  acted on by the ``stock_replenishment`` playbook (quotes, the cheapest supplier in time, a
  draft purchase order, procurement's approval above 5,000, submission, follow-ups until the
  supplier answers, the inventory; orders that cannot be completed to a person);
- campaigns: ``campaign_metrics -> campaign_click_insight -> campaign_sends`` (daily), acted on by
  the ``campaign_optimisation`` playbook (a subject-line by call-to-action experiment on the next
  sends of underperforming campaigns), judged by ``campaign_outcomes`` (the tracking endpoint's
  opens, clicks and unsubscribes, daily) through ``campaign_optimisation/experiment``.

Loaded by ``dagster-webserver -w workspace.yaml`` and ``dagster-daemon run -w workspace.yaml``.
Each execution layer is configured from the environment (see :mod:`resources.channels`,
:mod:`resources.host_channels`, :mod:`resources.stock_channels` and :mod:`sensors.settings`);
building the definitions opens no database and no connection.
"""

import dagster as dg

from assets import campaign_assets, churn_assets, host_assets, stock_assets
from sensors import (
    build_campaign_execution_defs,
    build_churn_execution_defs,
    build_host_remediation_execution_defs,
    build_stock_replenishment_execution_defs,
    campaign_day_job,
    campaign_tracking_job,
    churn_outcomes_job,
    churn_outcomes_schedule,
    churn_scoring_job,
    churn_scoring_schedule,
    host_scoring_job,
    host_scoring_schedule,
    stock_scoring_job,
    stock_scoring_schedule,
)


def build_defs(
    churn_execution: dg.Definitions | None = None,
    *,
    host_execution: dg.Definitions | None = None,
    stock_execution: dg.Definitions | None = None,
    campaign_execution: dg.Definitions | None = None,
) -> dg.Definitions:
    """Every story's assets, scoring jobs and schedules, merged with their execution layers.

    Args:
        churn_execution: The churn playbook's execution layer; None builds it from the
            environment.
        host_execution: The host-remediation playbook's execution layer; None builds it from
            the environment.
        stock_execution: The stock-replenishment playbook's execution layer; None builds it
            from the environment.
        campaign_execution: The campaign-optimisation playbook's execution layer; None builds
            it from the environment.

    Returns:
        The deployment's definitions.
    """
    pipelines = dg.Definitions(
        assets=[*churn_assets, *host_assets, *stock_assets, *campaign_assets],
        jobs=[
            churn_scoring_job,
            churn_outcomes_job,
            host_scoring_job,
            stock_scoring_job,
            campaign_day_job,
            campaign_tracking_job,
        ],
        schedules=[
            churn_scoring_schedule,
            churn_outcomes_schedule,
            host_scoring_schedule,
            stock_scoring_schedule,
        ],
    )
    return dg.Definitions.merge(
        pipelines,
        churn_execution if churn_execution is not None else build_churn_execution_defs(),
        host_execution if host_execution is not None else build_host_remediation_execution_defs(),
        stock_execution
        if stock_execution is not None
        else build_stock_replenishment_execution_defs(),
        campaign_execution if campaign_execution is not None else build_campaign_execution_defs(),
    )


defs = build_defs()
