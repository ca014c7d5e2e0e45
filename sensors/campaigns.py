"""The campaign-optimisation playbook's execution layer: the library's factory over ``campaign_sends``,
with the outcomes that judge its experiment.

:func:`build_campaign_execution_defs` is the whole integration, as for the other stories: the
insight (``campaign_sends``, daily: the recipients of the next sends of underperforming
campaigns), the playbook YAML with its ``subject_cta_grid`` experiment, the tracked email channel
and the ledger go into :func:`autoexec_dagster.dagster.defs_factory.build_execution_defs`, and
``outcomes=campaign_outcomes`` (the opens, clicks and unsubscribes the tracking endpoint
recorded, daily) closes the loop. It returns the execution assets ``campaign_optimisation/plan``,
``/actions`` and ``/escalations``, the outcome assets ``campaign_optimisation/experiment`` (the
variants' figures and the next day's weights), ``/learnings`` (Markdown) and ``/uplift`` (against
the holdout), the blocking checks on ``campaign_sends``, the jobs
``campaign_optimisation_execution_job`` and ``campaign_optimisation_outcomes_job``, and the
sensors that answer each new day of sends and of outcomes.

The sensors are STOPPED unless ``AUTOEXEC_SENSOR_STATUS=running`` (see :mod:`sensors.settings`):
switching them on makes every new day mail the recipients of the flagged campaigns.
"""

from collections.abc import Callable, Mapping
from datetime import datetime

import dagster as dg

from assets.campaigns import (
    PLAYBOOK_NAME,
    campaign_click_insight,
    campaign_metrics,
    campaign_outcomes,
    campaign_sends,
)
from autoexec_dagster import ActionLedger, Channel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from resources.campaign_channels import CAMPAIGN_PLAYBOOK_PATH, campaign_channels
from resources.channels import default_ledger_url
from sensors.settings import sensor_interval_from_env, sensor_status_from_env

__all__ = [
    "PLAYBOOK_NAME",
    "build_campaign_execution_defs",
    "campaign_day_job",
    "campaign_tracking_job",
]

# campaign_sends records how many recipients are flagged under this key (all of them: only the
# flagged campaigns send there), so the sensor decides without loading the day's rows.
FLAGGED_METADATA_KEY = "flagged"


def build_campaign_execution_defs(
    *,
    channels: Mapping[str, Channel] | None = None,
    ledger: ActionLedger | str | None = None,
    sensor_status: dg.DefaultSensorStatus | None = None,
    minimum_interval_seconds: int | None = None,
    ledger_clock: Callable[[], datetime] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dg.Definitions:
    """The execution layer of the campaign-optimisation playbook over ``campaign_sends``.

    Every argument left as None is read from the environment (see
    :mod:`resources.campaign_channels` and :mod:`sensors.settings`), which is what
    ``definitions.py`` does; the demo and the tests pass the channel of the SMTP sink and
    tracking endpoint they have just started and a ledger on their clock.

    Args:
        channels: Channel per action (``campaign_email``).
        ledger: The action ledger or its URL; its clock stamps the exposures and the updates.
        sensor_status: Whether the sensors run without being switched on in the UI.
        minimum_interval_seconds: Least time between two sensor ticks.
        ledger_clock: For a ledger given as a URL (or None): the time of exposures and
            experiment updates. Tests and demos only; None keeps the real time.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        Definitions to merge with the campaign assets.

    Raises:
        ValueError: An environment variable holds an invalid value.
    """
    return build_execution_defs(
        insight=campaign_sends,
        playbook=CAMPAIGN_PLAYBOOK_PATH,
        channels=channels if channels is not None else campaign_channels(environ=environ),
        ledger=ledger if ledger is not None else default_ledger_url(environ),
        sensor_default_status=sensor_status or sensor_status_from_env(environ),
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval_from_env(environ),
        flagged_metadata_key=FLAGGED_METADATA_KEY,
        ledger_clock=ledger_clock,
        outcomes=campaign_outcomes,
    )


# The day's pipeline up to the insight the playbook acts on, and the day's outcomes: what a
# scheduler (or the demo) materializes; the execution and the experiment follow from the sensors.
campaign_day_job = dg.define_asset_job(
    name="campaign_day_job",
    selection=dg.AssetSelection.assets(campaign_metrics, campaign_click_insight, campaign_sends),
    executor_def=dg.in_process_executor,
    description="One day's campaign metrics, the click insight and the next sends of the "
    "underperforming campaigns.",
)
campaign_tracking_job = dg.define_asset_job(
    name="campaign_tracking_job",
    selection=dg.AssetSelection.assets(campaign_outcomes),
    executor_def=dg.in_process_executor,
    description="One day's opens, clicks and unsubscribes from the tracking endpoint.",
)
