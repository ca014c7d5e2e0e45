"""The reference deployment's channels and action ledger, configured from the environment.

Every setting has a default that matches the local receivers (:mod:`resources.local_receivers`),
so ``make demo`` and ``make ui`` need no configuration; each can be overridden with an environment
variable, which is how a test points the deployment at its own temporary receivers and files:

========================  ================================================  =====================
variable                  meaning                                           default
========================  ================================================  =====================
``AUTOEXEC_VAR_DIR``      folder of the ledger, mailbox and CRM database    ``<project>/var``
``AUTOEXEC_SMTP_PORT``    port of the SMTP server on 127.0.0.1              ``8025``
``AUTOEXEC_CRM_URL``      the CRM's webhook endpoint                        ``http://127.0.0.1:9000/tasks``
``CRM_WEBHOOK_SECRET``    the CRM's signing secret (read at send time)      none: sends fail
``AUTOEXEC_LEDGER_URL``   SQLAlchemy URL of the action ledger               SQLite in the var folder
========================  ================================================  =====================

The secret is passed as ``dg.EnvVar``, so it is read when an action is sent and never stored in
the definitions, the UI or the ledger.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from autoexec_dagster import Channel, EmailChannel, WebhookChannel

PROJECT_DIR = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

VAR_DIR_ENV = "AUTOEXEC_VAR_DIR"
SMTP_PORT_ENV = "AUTOEXEC_SMTP_PORT"
CRM_URL_ENV = "AUTOEXEC_CRM_URL"
CRM_SECRET_ENV = "CRM_WEBHOOK_SECRET"
LEDGER_URL_ENV = "AUTOEXEC_LEDGER_URL"

DEFAULT_SMTP_PORT = 8025
DEFAULT_CRM_URL = f"http://{LOOPBACK}:9000/tasks"
LEDGER_FILE_NAME = "autoexec_ledger.db"
MAILBOX_DIR_NAME = "mailbox"
CRM_DB_NAME = "crm.sqlite"

# Reserved for documentation (RFC 2606), like every customer address the generator makes.
EMAIL_SENDER = "Northwind Customer Care <care@example.com>"
EMAIL_SUBJECT = "{{ name.split(' ')[0] }}, can we make {{ plan | capitalize }} work better for you?"
# Lines are short and whole sentences end them: mail clients reflow plain text badly.
EMAIL_TEMPLATE = """\
Hi {{ name.split(' ')[0] }},

Thank you for being a Northwind customer. We noticed you have not
been using your {{ plan | capitalize }} plan as much lately, and we
would like to make sure it still works for you.

{% if plan == "premium" -%}
As a Premium customer you can book a free 30-minute session with a
product specialist, who will set things up around the way your team
works today. Reply to this email with a time that suits you.
{%- elif plan == "standard" -%}
For the next three months your Standard plan is 20% off, applied
automatically to your next invoice. If something would make the
product more useful to you, reply and tell us: a person reads every
answer.
{%- else -%}
We have added a free month to your Basic plan. If you have outgrown
it, or it is not the right fit any more, reply and we will help you
find the plan that is.
{%- endif %}

Kind regards,
The Northwind Customer Care team

--
You receive this email as a Northwind customer ({{ customer_id }}).
"""
# What the CRM task carries: enough for the person who follows up, nothing more.
CRM_PAYLOAD_COLUMNS = [
    "customer_id",
    "name",
    "email",
    "plan",
    "lifetime_value",
    "churn_score",
    "confidence",
    "last_login_days",
    "support_tickets_90d",
]


def _env(name: str, environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip()


def var_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder holding the deployment's local state (ledger, mailbox, CRM database).

    Args:
        environ: Environment to read; the process environment when None.

    Returns:
        ``$AUTOEXEC_VAR_DIR`` as an absolute path, else ``var/`` in the project folder.
    """
    configured = _env(VAR_DIR_ENV, environ)
    return Path(configured).absolute() if configured else PROJECT_DIR / "var"


def mailbox_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder the local SMTP sink files messages into: ``<var>/mailbox``."""
    return var_dir(environ) / MAILBOX_DIR_NAME


def crm_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """The SQLite database of the local CRM receiver: ``<var>/crm.sqlite``."""
    return var_dir(environ) / CRM_DB_NAME


def default_ledger_url(environ: Mapping[str, str] | None = None) -> str:
    """The action ledger's SQLAlchemy URL.

    Args:
        environ: Environment to read; the process environment when None.

    Returns:
        ``$AUTOEXEC_LEDGER_URL`` when set, else a SQLite file in the var folder. The file is not
        created here: the library opens the ledger on first use, in the process that executes.
    """
    return _env(LEDGER_URL_ENV, environ) or f"sqlite:///{var_dir(environ) / LEDGER_FILE_NAME}"


def default_smtp_port(environ: Mapping[str, str] | None = None) -> int:
    """The SMTP port from ``$AUTOEXEC_SMTP_PORT`` (default 8025).

    Raises:
        ValueError: The variable is set but is not a port number.
    """
    raw = _env(SMTP_PORT_ENV, environ)
    if not raw:
        return DEFAULT_SMTP_PORT
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"{SMTP_PORT_ENV} must be a port number (1-65535), got {raw!r}")
    return int(raw)


def default_crm_url(environ: Mapping[str, str] | None = None) -> str:
    """The CRM webhook endpoint from ``$AUTOEXEC_CRM_URL`` (default port 9000 on 127.0.0.1)."""
    return _env(CRM_URL_ENV, environ) or DEFAULT_CRM_URL


def churn_channels(
    *,
    smtp_port: int | None = None,
    crm_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Channel]:
    """The channels of the churn playbook's two actions.

    Args:
        smtp_port: Port of the SMTP server on 127.0.0.1; the environment's when None.
        crm_url: The CRM's webhook endpoint; the environment's when None.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        ``retention_email``: an EmailChannel to the SMTP server, one email per customer, sent
        to the ``email`` column; ``crm_task``: a signed WebhookChannel to the CRM, allowed to
        reach 127.0.0.1 only.

    Raises:
        ValueError: ``$AUTOEXEC_SMTP_PORT`` is not a port number.
    """
    port = smtp_port if smtp_port is not None else default_smtp_port(environ)
    url = crm_url if crm_url is not None else default_crm_url(environ)
    return {
        "retention_email": EmailChannel(
            host=LOOPBACK,
            port=port,
            sender=EMAIL_SENDER,
            to_column="email",
            subject=EMAIL_SUBJECT,
            template=EMAIL_TEMPLATE,
        ),
        "crm_task": WebhookChannel(
            url=url,
            secret=dg.EnvVar(CRM_SECRET_ENV),
            allowed_hosts=[LOOPBACK],
            payload_columns=CRM_PAYLOAD_COLUMNS,
        ),
    }
