"""The stock-replenishment playbook's execution layer: the library's factory over ``stock_shortages``.

:func:`build_stock_replenishment_execution_defs` is the whole integration, as for the other
stories: the insight (``stock_shortages``, daily), the playbook YAML with its ``replenish``
workflow, the channels (the catalogue query, the supplier API's webhooks, the inventory update and
the approvers' email), the ledger and the approval links go into
:func:`autoexec_dagster.dagster.defs_factory.build_execution_defs`. It returns the execution assets
``stock_replenishment/plan``, ``/actions``, ``/escalations`` and ``/approvals`` (the day's approval
queue), the blocking checks on ``stock_shortages`` and the ``stock_replenishment_approval_sla``
check, the job ``stock_replenishment_execution_job``, the sensor that answers each new day and the
sensor that requests a run whenever workflow work is due: a follow-up poll, an approval's SLA or
expiry, or a decision a person has just made (from the command line or a signed link). So no
process waits for a supplier or an approver.

The sensors are STOPPED unless ``AUTOEXEC_SENSOR_STATUS=running`` (see :mod:`sensors.settings`):
switching them on makes every new day send purchase orders to suppliers.
"""

from collections.abc import Callable, Mapping
from datetime import datetime

import dagster as dg

from assets import stock_shortages
from autoexec_dagster import ActionLedger, ApprovalLinks, Channel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from resources.channels import default_ledger_url
from resources.stock_channels import STOCK_PLAYBOOK_PATH, approval_links_from_env, stock_channels
from sensors.settings import sensor_interval_from_env, sensor_status_from_env

PLAYBOOK_NAME = "stock_replenishment"
# stock_shortages records how many SKUs are short under this key; the playbook's one rule acts on
# exactly those (`flagged`), so the sensor decides without loading the day's 500 rows.
FLAGGED_METADATA_KEY = "flagged"


def build_stock_replenishment_execution_defs(
    *,
    channels: Mapping[str, Channel] | None = None,
    ledger: ActionLedger | str | None = None,
    approval_links: ApprovalLinks | None = None,
    sensor_status: dg.DefaultSensorStatus | None = None,
    minimum_interval_seconds: int | None = None,
    ledger_clock: Callable[[], datetime] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dg.Definitions:
    """The execution layer of the stock-replenishment playbook over ``stock_shortages``.

    Every argument left as None is read from the environment (see
    :mod:`resources.stock_channels` and :mod:`sensors.settings`), which is what ``definitions.py``
    does; the demo and the tests pass the channels of the supplier API and SMTP sink they have
    just started, a ledger on their clock and their approval links.

    Args:
        channels: Channel per workflow action (``supplier_quotes``, ``draft_po``, ...).
        ledger: The action ledger or its URL; its clock decides when workflow work is due.
        approval_links: Where ``autoexec serve`` answers the signed links, and their secret;
            from ``$AUTOEXEC_APPROVAL_URL``/``$AUTOEXEC_APPROVAL_SECRET`` when None (no links
            when the secret is unset: the emails then name the request for the command line).
        sensor_status: Whether the sensors run without being switched on in the UI.
        minimum_interval_seconds: Least time between two sensor ticks.
        ledger_clock: For a ledger given as a URL (or None): the time workflows are due by, in
            the sensors and the runs alike. Tests and demos only; None keeps the real time.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        Definitions to merge with the stock assets.

    Raises:
        ValueError: An environment variable holds an invalid value.
        LinkError: ``$AUTOEXEC_APPROVAL_SECRET`` is set but the links cannot be made from it.
    """
    return build_execution_defs(
        insight=stock_shortages,
        playbook=STOCK_PLAYBOOK_PATH,
        channels=channels if channels is not None else stock_channels(environ=environ),
        ledger=ledger if ledger is not None else default_ledger_url(environ),
        sensor_default_status=sensor_status or sensor_status_from_env(environ),
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval_from_env(environ),
        flagged_metadata_key=FLAGGED_METADATA_KEY,
        ledger_clock=ledger_clock,
        approval_links=(
            approval_links if approval_links is not None else approval_links_from_env(environ)
        ),
    )
