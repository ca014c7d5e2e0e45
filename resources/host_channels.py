"""The host-remediation story's playbook and channels, configured from the environment.

Each action of the playbook's ``remediate`` workflow is one signed ``POST`` to the
infrastructure API (:mod:`resources.infra_api`, the local stand-in for a fleet manager): one
:class:`~autoexec_dagster.WebhookChannel` per action of ``ACTION_ENDPOINTS``. Like the churn
channels (:mod:`resources.channels`), every setting has a default that matches the local API, so
``make demo`` and ``make ui`` need no configuration:

===========================  ==============================================  ===========================
variable                     meaning                                         default
===========================  ==============================================  ===========================
``AUTOEXEC_INFRA_API_URL``   base URL of the infrastructure API              ``http://127.0.0.1:9100``
``INFRA_API_SECRET``         its signing secret (read at send time)          none: sends fail
``AUTOEXEC_VAR_DIR``         folder of the API's database ``infra.sqlite``   ``<project>/var``
===========================  ==============================================  ===========================

The secret is passed as ``dg.EnvVar``, so it is read when a step is sent and never stored in the
definitions, the UI or the ledger. The base URL is read when the definitions are built: the six
endpoint URLs are derived from it, and a ``dg.EnvVar`` resolves only as a whole value.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from autoexec_dagster import Channel, WebhookChannel
from resources.channels import LOOPBACK, var_dir
from resources.infra_api import ACTION_ENDPOINTS, DEFAULT_PORT

HOST_REMEDIATION_PLAYBOOK_PATH = Path(__file__).with_name("host_remediation_playbook.yaml")

INFRA_API_URL_ENV = "AUTOEXEC_INFRA_API_URL"
INFRA_SECRET_ENV = "INFRA_API_SECRET"
DEFAULT_INFRA_API_URL = f"http://{LOOPBACK}:{DEFAULT_PORT}"
INFRA_DB_NAME = "infra.sqlite"

# What a fleet manager needs to act on a host; the metrics stay in the insight and the ledger.
# entity_id and partition_key travel in every body anyway: the API finds the host and the hour
# of its incident from them.
HOST_PAYLOAD_COLUMNS = ["host_id", "role", "datacenter", "partition_hour", "anomaly_score"]

# The API sheds load with 503s that clear within a second or two (5% of requests by default).
# Six attempts make a step that never gets through about one in 60 million at that rate; the
# short, capped backoff keeps a retried step inside the same advance run, instead of the
# 30 s default cap leaving a whole batch waiting on one slow retry.
MAX_ATTEMPTS = 6
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_MAX_SECONDS = 4.0
# A remediation step is a control-plane call: a few in flight per action is plenty, and keeps a
# fault storm from hammering the fleet manager.
MAX_CONCURRENCY = 16


def default_infra_api_url(environ: Mapping[str, str] | None = None) -> str:
    """The infrastructure API's base URL from ``$AUTOEXEC_INFRA_API_URL`` (no trailing slash)."""
    configured = (os.environ if environ is None else environ).get(INFRA_API_URL_ENV, "").strip()
    return (configured or DEFAULT_INFRA_API_URL).rstrip("/")


def infra_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """The SQLite database of the local infrastructure API: ``<var>/infra.sqlite``."""
    return var_dir(environ) / INFRA_DB_NAME


def host_channels(
    *,
    base_url: str | None = None,
    urls: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Channel]:
    """The channels of the host-remediation playbook's six step actions.

    Args:
        base_url: The infrastructure API's base URL; the environment's when None.
        urls: Action name -> endpoint URL (the API's ready line prints them); overrides
            ``base_url`` for the actions it names.
        environ: Environment to read the defaults from; the process environment when None.

    Returns:
        One signed WebhookChannel per action of ``ACTION_ENDPOINTS`` (``isolate_host``,
        ``run_diagnostics``, ``restart_service``, ``clean_disk``, ``host_health``,
        ``reinstate_host``), allowed to reach 127.0.0.1 only.
    """
    base = (base_url or default_infra_api_url(environ)).rstrip("/")
    given = dict(urls or {})
    return {
        action: WebhookChannel(
            url=given.get(action, f"{base}/{endpoint}"),
            secret=dg.EnvVar(INFRA_SECRET_ENV),
            allowed_hosts=[LOOPBACK],
            payload_columns=HOST_PAYLOAD_COLUMNS,
            max_attempts=MAX_ATTEMPTS,
            backoff_base_seconds=BACKOFF_BASE_SECONDS,
            backoff_max_seconds=BACKOFF_MAX_SECONDS,
            max_concurrency=MAX_CONCURRENCY,
        )
        for action, endpoint in ACTION_ENDPOINTS.items()
    }
