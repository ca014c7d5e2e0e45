"""The stock-replenishment story's playbook and channels, configured from the environment.

The ``replenish`` workflow of ``resources/stock_playbook.yaml`` runs through five channels:

================  =============================================================================
action            channel
================  =============================================================================
supplier_quotes   :class:`~autoexec_dagster.SqlQueryChannel`: every active supplier's offer of
                  the SKU from the catalogue (:mod:`resources.suppliers`), read-only
draft_po          signed webhook ``POST /purchase-orders`` of the supplier API
                  (:mod:`resources.supplier_api`): a draft order, priced by the gateway
submit_po         signed webhook ``POST /purchase-orders/submit``: the order goes to the supplier
po_status         signed webhook ``POST /purchase-orders/status``: the supplier's answer
update_inventory  :class:`~autoexec_dagster.PythonChannel`: the confirmed order's quantity goes
                  on order in the catalogue's inventory, once per purchase order
approver_email    :class:`ApproverEmailChannel`: the approval request to each approver, by name,
                  with the order's summary and the signed approve and reject links
================  =============================================================================

Every setting has a default that matches the local supplier API and SMTP sink, so ``make demo``
and ``make ui`` need no configuration:

=============================  ===========================================  =========================
variable                       meaning                                      default
=============================  ===========================================  =========================
``AUTOEXEC_SUPPLIER_API_URL``  base URL of the supplier API                 ``http://127.0.0.1:9200``
``SUPPLIER_API_SECRET``        its signing secret (read at send time)       none: sends fail
``AUTOEXEC_SMTP_PORT``         port of the SMTP server on 127.0.0.1         ``8025``
``AUTOEXEC_VAR_DIR``           folder of ``suppliers.sqlite`` (catalogue    ``<project>/var``
                               and inventory) and ``supplier_api.sqlite``
``AUTOEXEC_APPROVAL_URL``      where ``autoexec serve`` answers the links   none: no links
``AUTOEXEC_APPROVAL_SECRET``   the links' signing secret                    none: no links
=============================  ===========================================  =========================

Without the approval variables the emails still go out and name the request for the command line
(``autoexec approve KEY --by procurement``); with them each email carries signed links.
"""

import dataclasses
import datetime as dt
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from autoexec_dagster import (
    ApprovalLinks,
    Channel,
    EmailChannel,
    PythonChannel,
    SqlQueryChannel,
    WebhookChannel,
)
from autoexec_dagster.approvals.links import BASE_URL_ENV, SECRET_ENV
from autoexec_dagster.channels.base import ActionRequest, Delivered
from autoexec_dagster.errors import PermanentChannelError
from resources.channels import LOOPBACK, default_smtp_port, var_dir
from resources.suppliers import SupplierCatalogue

__all__ = [
    "APPROVER_ADDRESSES",
    "STOCK_PLAYBOOK_PATH",
    "ApproverEmailChannel",
    "InventoryRecorder",
    "approval_links_from_env",
    "catalogue_path",
    "default_supplier_api_url",
    "stock_channels",
    "supplier_api_db_path",
]

STOCK_PLAYBOOK_PATH = Path(__file__).with_name("stock_playbook.yaml")

SUPPLIER_API_URL_ENV = "AUTOEXEC_SUPPLIER_API_URL"
SUPPLIER_SECRET_ENV = "SUPPLIER_API_SECRET"
DEFAULT_SUPPLIER_API_URL = f"http://{LOOPBACK}:9200"
CATALOGUE_DB_NAME = "suppliers.sqlite"
SUPPLIER_API_DB_NAME = "supplier_api.sqlite"

# Who may decide, and where their requests are mailed. The names are what people give as
# `--by` and what the links are signed for; addresses are RFC 2606 documentation domains.
APPROVER_ADDRESSES = {
    "procurement": "Procurement <procurement@example.com>",
    "finance": "Finance <finance@example.com>",
}
EMAIL_SENDER = "Northwind Replenishment <replenishment@example.com>"

# What the gateway needs to draft an order: the SKU and the earlier steps' outputs (the chosen
# supplier and quantity from `choose`); the rest is for the supplier's own record.
DRAFT_PAYLOAD_COLUMNS = ["sku", "product", "category", "reorder_qty", "needed_by", "steps"]
# /submit and /status need the order's id, which the steps' outputs carry.
ORDER_PAYLOAD_COLUMNS = ["sku", "steps"]
# The gateway sheds load with 503s now and then: a few attempts with a short, capped backoff
# keep a retried step inside the same run.
MAX_ATTEMPTS = 4
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_MAX_SECONDS = 4.0
# A submission waits for the supplier's own system. One that has not answered within this long
# is not going to: two attempts, then the step fails and the order goes to a person with its
# history (the silent supplier of the demo never answers; the API holds its requests).
SUBMIT_TIMEOUT_SECONDS = 5.0
SUBMIT_MAX_ATTEMPTS = 2

# Every active supplier's offer of the SKU, cheapest first; the `choose` transform decides which
# can deliver in time (the query returns the others too, so the record says why they lost).
QUOTES_SQL = """
SELECT i.supplier_id, s.name AS supplier_name, i.unit_price, i.lead_time_days,
       i.available_qty, i.pack_size
FROM supplier_items AS i JOIN suppliers AS s ON s.supplier_id = i.supplier_id
WHERE i.sku = :sku AND s.active = 1
ORDER BY i.unit_price, i.lead_time_days, i.supplier_id
"""

APPROVAL_SUBJECT = (
    "Approve {{ steps.draft_po.po_id }}: {{ steps.draft_po.quantity }} x {{ product }} from "
    "{{ steps.draft_po.supplier_name }}, {{ steps.draft_po.currency }} "
    "{{ '{:,.2f}'.format(steps.draft_po.total) }}"
)
# Lines are short and whole sentences end them: mail clients reflow plain text badly.
APPROVAL_TEMPLATE = """\
Hello {{ approver }},

A replenishment order waits for {% if min_approvals > 1 %}{{ min_approvals }} approvals \
({{ approvers | join(' and ') }}){% else %}your approval{% endif %}: its total is above what
an order may reach without a person ({{ condition | replace('`', '') }}).
Nothing goes to the supplier until it is approved.
{% set po = steps.draft_po %}{% set chosen = steps.choose %}
  Purchase order  {{ po.po_id }} (a draft: nothing is sent to the supplier yet)
  Item            {{ sku }} {{ product }} ({{ category | replace('_', ' ') }})
  Quantity        {{ '{:,}'.format(po.quantity) }} units ({{ (po.quantity // po.pack_size) }} packs \
of {{ po.pack_size }})
  Supplier        {{ po.supplier_id }} {{ po.supplier_name }}, delivers in \
{{ po.lead_time_days }} days
  Unit price      {{ po.currency }} {{ '{:,.2f}'.format(po.unit_price) }}
  Total           {{ po.currency }} {{ '{:,.2f}'.format(po.total) }}

Why now
  On hand {{ '{:,}'.format(on_hand) }}, on order {{ '{:,}'.format(on_order) }}. The forecast \
demand over the
  {{ lead_time_days }}-day lead time is {{ '{:,.0f}'.format(forecast_demand) }} units: \
{{ '{:,}'.format(shortfall) }} short by {{ needed_by }}.
{%- if on_promotion_ahead %}
  A promotion of this item runs within the lead time.
{%- endif %}
  {{ po.supplier_name }} is the cheapest of the {{ chosen.offers_in_time }} of \
{{ chosen.offers }} offers that
  arrive in time with enough stock.
{%- if chosen.passed_over %}
  Cheaper but not taken: {{ chosen.passed_over }}.
{%- endif %}

{% if approve_url -%}
Decide (each link opens a page that shows the order; nothing is decided
until you press its button):

  Approve: {{ approve_url }}

  Reject:  {{ reject_url }}

{% endif -%}
Or from a terminal:

  autoexec approve {{ approval_id[:12] }} --by {{ approver }}
  autoexec reject {{ approval_id[:12] }} --by {{ approver }} --note "why"

Without a decision by {{ expires_at.strftime('%Y-%m-%d %H:%M') }} UTC the request expires and
the order goes to a person as an escalation. Please answer within a day.

--
Northwind replenishment ({{ playbook }}, {{ partition_key }}); approval request {{ approval_id }}
"""


def _env(name: str, environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip()


def default_supplier_api_url(environ: Mapping[str, str] | None = None) -> str:
    """The supplier API's base URL from ``$AUTOEXEC_SUPPLIER_API_URL`` (no trailing slash)."""
    return (_env(SUPPLIER_API_URL_ENV, environ) or DEFAULT_SUPPLIER_API_URL).rstrip("/")


def catalogue_path(environ: Mapping[str, str] | None = None) -> Path:
    """The supplier catalogue and inventory database: ``<var>/suppliers.sqlite``."""
    return var_dir(environ) / CATALOGUE_DB_NAME


def supplier_api_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """The supplier API's own record: ``<var>/supplier_api.sqlite``."""
    return var_dir(environ) / SUPPLIER_API_DB_NAME


def approval_links_from_env(environ: Mapping[str, str] | None = None) -> ApprovalLinks | None:
    """Signed approval links from ``$AUTOEXEC_APPROVAL_URL`` and ``$AUTOEXEC_APPROVAL_SECRET``.

    Args:
        environ: Environment to read; the process environment when None.

    Returns:
        None when the secret is unset: the emails then name the request for the command line.

    Raises:
        LinkError: The secret is set but too short, or the URL is missing or not http(s).
    """
    secret = _env(SECRET_ENV, environ)
    if not secret:
        return None
    # Read here rather than with ApprovalLinks.from_env: `environ` may not be the process's.
    return ApprovalLinks(base_url=_env(BASE_URL_ENV, environ), secret=secret)


class _AddressedSender:
    """Adds each approver's address to the request, then sends it as the email channel would."""

    def __init__(self, inner: Any, addresses: Mapping[str, str]) -> None:
        self._inner = inner
        self._addresses = addresses

    async def send(self, request: ActionRequest) -> Delivered | str:
        return await self._inner.send(addressed(request, self._addresses))


def addressed(request: ActionRequest, addresses: Mapping[str, str]) -> ActionRequest:
    """The request with ``approver_email``: the address of the approver it names.

    Raises:
        PermanentChannelError: The approver has no address (a resend cannot fix that).
    """
    approver = str(request.data.get("approver", ""))
    address = addresses.get(approver)
    if address is None:
        raise PermanentChannelError(
            f"ApproverEmailChannel: no address for approver {approver!r}; known: "
            f"{sorted(addresses)}"
        )
    return dataclasses.replace(request, data={**request.data, "approver_email": address})


class ApproverEmailChannel(EmailChannel):
    """An email to each approver of a request, addressed by the approver's name.

    Approval gates name approvers as people sign (``procurement``), and their notifications
    carry that name as ``approver``; this channel looks the address up in
    ``approver_addresses`` and sends as :class:`~autoexec_dagster.EmailChannel` does, with the
    address in ``approver_email``.
    """

    approver_addresses: dict[str, str] = Field(
        description="Approver name -> email address ('Name <address>' allowed)."
    )
    to_column: str = Field(
        default="approver_email", description="Filled from approver_addresses; leave as it is."
    )

    # The base class names its own private sender type; this one wraps that sender.
    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_AddressedSender]:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Open the email channel's SMTP pool, addressing each request on its way."""
        async with super().open_sender() as sender:
            yield _AddressedSender(sender, self.approver_addresses)

    def request_digest(self, request: ActionRequest) -> str:
        """As the email channel's, of the addressed request (an unknown approver: unaddressed)."""
        with suppress(PermanentChannelError):
            request = addressed(request, self.approver_addresses)
        return super().request_digest(request)


class InventoryRecorder:
    """The ``update_inventory`` step: a confirmed order goes on order in the inventory, once.

    Called by a :class:`~autoexec_dagster.PythonChannel` with the step's request; the purchase
    order (id, SKU, quantity, supplier) comes from the ``draft_po`` step's output. The catalogue
    applies each ``po_id`` once (:meth:`SupplierCatalogue.record_purchase_order`), so a resent
    step changes nothing the second time.

    Args:
        path: The catalogue database.
        clock: The time recorded as ``updated_at``; real UTC time when None.
    """

    def __init__(
        self, path: str | os.PathLike[str], clock: Callable[[], dt.datetime] | None = None
    ):
        self.catalogue = SupplierCatalogue(path)
        self.clock = clock

    def __call__(self, request: ActionRequest) -> dict[str, Any]:
        """Record the order; returns the SKU's inventory row and whether this call applied it.

        Raises:
            PermanentChannelError: The request carries no purchase order (nothing is recorded).
        """
        steps = request.data.get("steps") or {}
        order = steps.get("draft_po") if isinstance(steps, Mapping) else None
        if not isinstance(order, Mapping) or not order.get("po_id"):
            raise PermanentChannelError("update_inventory: the request carries no draft_po.po_id")
        return self.catalogue.record_purchase_order(
            po_id=str(order["po_id"]),
            sku=str(order.get("sku") or request.entity_id),
            quantity=int(order["quantity"]),
            supplier_id=str(order["supplier_id"]) if order.get("supplier_id") else None,
            at=self.clock() if self.clock is not None else None,
        )


def stock_channels(
    *,
    base_url: str | None = None,
    urls: Mapping[str, str] | None = None,
    smtp_port: int | None = None,
    catalogue: str | os.PathLike[str] | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    submit_timeout_seconds: float = SUBMIT_TIMEOUT_SECONDS,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Channel]:
    """The channels of the replenishment workflow's six actions.

    Args:
        base_url: The supplier API's base URL; the environment's when None.
        urls: Endpoint name (``create``, ``submit``, ``status``) -> URL, as the API's ready line
            prints them; overrides ``base_url`` for the endpoints it names.
        smtp_port: Port of the SMTP server on 127.0.0.1; the environment's when None.
        catalogue: The catalogue and inventory database; ``<var>/suppliers.sqlite`` when None.
        clock: The time the inventory update records; real time when None.
        submit_timeout_seconds: How long one submission may wait for the supplier.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        Action name -> channel (see the module docstring). The webhooks may reach 127.0.0.1
        only; their secret is ``dg.EnvVar("SUPPLIER_API_SECRET")``, read at send time.

    Raises:
        ValueError: ``$AUTOEXEC_SMTP_PORT`` is not a port number.
    """
    from resources.supplier_api import ENDPOINTS

    base = (base_url or default_supplier_api_url(environ)).rstrip("/")
    given = dict(urls or {})
    path = Path(catalogue) if catalogue is not None else catalogue_path(environ)

    def webhook(endpoint: str, columns: list[str], **options: Any) -> WebhookChannel:
        settings: dict[str, Any] = {
            "max_attempts": MAX_ATTEMPTS,
            "backoff_base_seconds": BACKOFF_BASE_SECONDS,
            "backoff_max_seconds": BACKOFF_MAX_SECONDS,
            "max_concurrency": 16,
            **options,
        }
        return WebhookChannel(
            url=given.get(endpoint, base + ENDPOINTS[endpoint]),
            secret=dg.EnvVar(SUPPLIER_SECRET_ENV),
            allowed_hosts=[LOOPBACK],
            payload_columns=columns,
            **settings,
        )

    port = smtp_port if smtp_port is not None else default_smtp_port(environ)
    return {
        "supplier_quotes": SqlQueryChannel(
            url=f"sqlite:///{path}",
            query=QUOTES_SQL,
            params={"sku": "sku"},
            returns="rows",
            max_rows=20,
        ),
        "draft_po": webhook("create", DRAFT_PAYLOAD_COLUMNS),
        "submit_po": webhook(
            "submit",
            ORDER_PAYLOAD_COLUMNS,
            timeout_seconds=submit_timeout_seconds,
            max_attempts=SUBMIT_MAX_ATTEMPTS,
        ),
        "po_status": webhook("status", ORDER_PAYLOAD_COLUMNS),
        "update_inventory": PythonChannel.from_callable(
            InventoryRecorder(path, clock),
            permanent_errors=["KeyError", "ValueError"],
            max_concurrency=4,
        ),
        "approver_email": ApproverEmailChannel(
            host=LOOPBACK,
            port=port,
            sender=EMAIL_SENDER,
            approver_addresses=dict(APPROVER_ADDRESSES),
            subject=APPROVAL_SUBJECT,
            template=APPROVAL_TEMPLATE,
        ),
    }
