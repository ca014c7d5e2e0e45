"""The campaign-optimisation story's playbook and channel, configured from the environment.

The playbook (``resources/campaign_playbook.yaml``) has one action, ``campaign_email``: the next
send of an underperforming campaign, one email per recipient, through
:class:`CampaignEmailChannel` to the SMTP server. Its experiment's variants override the
channel's ``subject``, ``template`` and ``html_template`` (:mod:`resources.campaign_variants`).

The tracking links. Each email carries links that name it, signed for the tracking endpoint
(:mod:`resources.tracking_server`): the click ``tracking_url``, the ``unsubscribe_url`` and the
HTML part's ``open_pixel_url``. The token signs the recipient, the campaign and the action's
idempotency key, so it is made when the request is sent, where the key is known, rather than in
the insight (a plan row does not hold its key): the channel adds the three links to the
request's row before the email is rendered, so the templates use them like any column, and a
resend carries the same links. Validation renders with placeholder links.

=================================  ==========================================  ===================
variable                           meaning                                     default
=================================  ==========================================  ===================
``AUTOEXEC_SMTP_PORT``             port of the SMTP server on 127.0.0.1        ``8025``
``AUTOEXEC_TRACKING_URL``          base URL of the tracking endpoint           ``http://127.0.0.1:9300``
``CAMPAIGN_TRACKING_SECRET``       the tracking tokens' secret (read at send   none: sends fail
                                   time)
``AUTOEXEC_VAR_DIR``               folder of ``campaign_tracking.sqlite``      ``<project>/var``
=================================  ==========================================  ===================
"""

import dataclasses
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from autoexec_dagster import Channel, EmailChannel
from autoexec_dagster.channels.base import ActionRequest, Delivered, resolve_secret
from autoexec_dagster.errors import ChannelConfigError, PermanentChannelError
from resources.campaign_variants import BODY_TEMPLATE, CONTROL, HTML_TEMPLATE, playbook_variants
from resources.channels import LOOPBACK, default_smtp_port, var_dir
from resources.tracking_server import DEFAULT_SECRET_ENV, sign_token

__all__ = [
    "CAMPAIGN_PLAYBOOK_PATH",
    "CampaignEmailChannel",
    "campaign_channels",
    "default_tracking_url",
    "tracking_db_path",
    "tracking_links",
]

CAMPAIGN_PLAYBOOK_PATH = Path(__file__).with_name("campaign_playbook.yaml")
TRACKING_URL_ENV = "AUTOEXEC_TRACKING_URL"
TRACKING_SECRET_ENV = DEFAULT_SECRET_ENV
DEFAULT_TRACKING_URL = f"http://{LOOPBACK}:9300"
TRACKING_DB_NAME = "campaign_tracking.sqlite"
EMAIL_SENDER = "Northwind Campaigns <campaigns@example.com>"
# The link columns the channel adds, and what validation renders in their place.
LINK_COLUMNS = ("tracking_url", "open_pixel_url", "unsubscribe_url")
_PLACEHOLDER_TOKEN = "token"


def _env(name: str, environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip()


def default_tracking_url(environ: Mapping[str, str] | None = None) -> str:
    """The tracking endpoint's base URL from ``$AUTOEXEC_TRACKING_URL`` (no trailing slash)."""
    return (_env(TRACKING_URL_ENV, environ) or DEFAULT_TRACKING_URL).rstrip("/")


def tracking_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """The tracking endpoint's events: ``<var>/campaign_tracking.sqlite``."""
    return var_dir(environ) / TRACKING_DB_NAME


def tracking_links(base_url: str, token: str) -> dict[str, str]:
    """The three links of one email: click, open pixel and unsubscribe."""
    base = base_url.rstrip("/")
    return {
        "tracking_url": f"{base}/c/{token}",
        "open_pixel_url": f"{base}/o/{token}.gif",
        "unsubscribe_url": f"{base}/u/{token}",
    }


class _TrackedSender:
    """Adds the request's signed links to its row, then sends it as the email channel would."""

    def __init__(self, inner: Any, channel: "CampaignEmailChannel", secret: str) -> None:
        self._inner = inner
        self._channel = channel
        self._secret = secret

    async def send(self, request: ActionRequest) -> Delivered | str:
        return await self._inner.send(self._channel.with_links(request, self._secret))


class CampaignEmailChannel(EmailChannel):
    """An email per recipient whose links lead to the tracking endpoint, signed per email.

    The templates see ``tracking_url``, ``open_pixel_url`` and ``unsubscribe_url`` besides the
    plan row's columns; see the module docstring.
    """

    tracking_base_url: str = Field(description="Base URL of the tracking endpoint.")
    tracking_secret: str = Field(
        description="Secret the tracking tokens are signed with; use dg.EnvVar, never a literal."
    )
    campaign_column: str = Field(
        default="campaign_id", description="Plan column holding the campaign id."
    )

    def required_columns(self) -> set[str]:
        """The recipient and the campaign columns."""
        return {*super().required_columns(), self.campaign_column}

    def with_links(self, request: ActionRequest, secret: str) -> ActionRequest:
        """The request with its three signed links added to its row.

        Raises:
            PermanentChannelError: The row has no campaign (a resend cannot fix that).
        """
        campaign = request.data.get(self.campaign_column)
        if campaign is None or not str(campaign).strip():
            raise PermanentChannelError(
                f"CampaignEmailChannel: entity_id {request.entity_id!r} has no "
                f"{self.campaign_column!r}"
            )
        token = sign_token(
            secret,
            recipient_id=request.entity_id,
            campaign_id=str(campaign),
            idempotency_key=request.idempotency_key,
        )
        links = tracking_links(self.tracking_base_url, token)
        return dataclasses.replace(request, data={**request.data, **links})

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """As the email channel's, with placeholder links where the signed ones will be."""
        clash = sorted(set(LINK_COLUMNS) & set(rows.columns))
        if clash:
            raise ChannelConfigError(
                f"CampaignEmailChannel: the plan already has column(s) {clash}, which the "
                "channel fills with the signed links"
            )
        placeholders = tracking_links(self.tracking_base_url, _PLACEHOLDER_TOKEN)
        super().validate_rows(rows.assign(**placeholders))

    # The base class names its own private sender type; this one wraps that sender.
    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_TrackedSender]:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Open the email channel's SMTP pool, adding each request's links on its way."""
        secret = resolve_secret(self.tracking_secret)
        if not secret:
            raise ChannelConfigError("CampaignEmailChannel: the tracking secret is empty")
        async with super().open_sender() as sender:
            yield _TrackedSender(sender, self, secret)

    def describe(self) -> dict[str, Any]:
        """The email channel's description and the tracking endpoint; never the secret."""
        return {**super().describe(), "tracking_base_url": self.tracking_base_url}


def campaign_channels(
    *,
    smtp_port: int | None = None,
    tracking_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Channel]:
    """The channel of the playbook's one action, ``campaign_email``.

    Without an experiment variant (the control's texts) the channel sends the control's subject
    and bodies; each variant overrides them.

    Args:
        smtp_port: Port of the SMTP server on 127.0.0.1; the environment's when None.
        tracking_url: Base URL of the tracking endpoint; the environment's when None.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        ``{"campaign_email": CampaignEmailChannel(...)}``, its secret
        ``dg.EnvVar("CAMPAIGN_TRACKING_SECRET")``, read at send time.

    Raises:
        ValueError: ``$AUTOEXEC_SMTP_PORT`` is not a port number.
    """
    control = playbook_variants()[CONTROL]
    port = smtp_port if smtp_port is not None else default_smtp_port(environ)
    return {
        "campaign_email": CampaignEmailChannel(
            host=LOOPBACK,
            port=port,
            sender=EMAIL_SENDER,
            to_column="email",
            subject=control["subject"],
            template=control.get("template", BODY_TEMPLATE),
            html_template=control.get("html_template", HTML_TEMPLATE),
            tracking_base_url=(tracking_url or default_tracking_url(environ)).rstrip("/"),
            tracking_secret=dg.EnvVar(TRACKING_SECRET_ENV),
            # One sink on the loopback: enough sessions to keep it busy, few enough to stay polite.
            max_concurrency=16,
        )
    }
