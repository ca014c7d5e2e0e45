"""The reference deployment's demo (``make demo``) and local UI (``make ui``).

The stories live in their own modules (:mod:`demo.churn`, :mod:`demo.hosts`, :mod:`demo.stock`),
the Dagster plumbing they share in :mod:`demo.runs`. This package holds what the demo and the UI share and
imports nothing heavy, so ``python -m demo.ui`` starts at once: where the Dagster instance lives,
and the local destinations' signing secrets.
"""

import base64
import os
import secrets
import shutil
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
DAGSTER_YAML_TEMPLATE = PROJECT_DIR / "dagster.yaml"
DEFAULT_DAGSTER_HOME = PROJECT_DIR / ".dagster_home"
CRM_SECRET_ENV = "CRM_WEBHOOK_SECRET"
INFRA_SECRET_ENV = "INFRA_API_SECRET"
SUPPLIER_SECRET_ENV = "SUPPLIER_API_SECRET"
APPROVAL_SECRET_ENV = "AUTOEXEC_APPROVAL_SECRET"


def prepare_dagster_home() -> Path:
    """Make ``$DAGSTER_HOME`` usable, defaulting it to the project's ``.dagster_home``.

    Creates the folder and copies the project's ``dagster.yaml`` into it when it has none (an
    existing one is the operator's and is left alone). Sets ``DAGSTER_HOME`` in this process's
    environment, so child processes and ``DagsterInstance.get()`` use the same instance.

    Returns:
        The absolute path of the instance folder.
    """
    configured = os.environ.get("DAGSTER_HOME", "").strip()
    # Dagster refuses a relative DAGSTER_HOME; resolve it rather than fail.
    home = Path(configured).absolute() if configured else DEFAULT_DAGSTER_HOME
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        shutil.copyfile(DAGSTER_YAML_TEMPLATE, target)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def ensure_secret(name: str) -> str:
    """A webhook signing secret, generated into the environment variable ``name`` when unset.

    The demo's local destinations and the webhook channels read the same variable, so a fresh
    random secret per session is enough; a real deployment sets it from its secret store.

    Args:
        name: The environment variable.

    Returns:
        The secret (``whsec_<base64>``).
    """
    current = os.environ.get(name, "").strip()
    if current:
        return current
    generated = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    os.environ[name] = generated
    return generated


def ensure_crm_secret() -> str:
    """The CRM's webhook signing secret (``$CRM_WEBHOOK_SECRET``); see :func:`ensure_secret`."""
    return ensure_secret(CRM_SECRET_ENV)


def ensure_infra_secret() -> str:
    """The infrastructure API's signing secret (``$INFRA_API_SECRET``); see :func:`ensure_secret`."""
    return ensure_secret(INFRA_SECRET_ENV)


def ensure_supplier_secret() -> str:
    """The supplier API's signing secret (``$SUPPLIER_API_SECRET``); see :func:`ensure_secret`."""
    return ensure_secret(SUPPLIER_SECRET_ENV)


def ensure_approval_secret() -> str:
    """The approval links' signing secret (``$AUTOEXEC_APPROVAL_SECRET``, shared by the workflow
    that signs the links and ``autoexec serve`` that checks them); see :func:`ensure_secret`."""
    return ensure_secret(APPROVAL_SECRET_ENV)
