"""Resources of the reference deployment: the churn playbook, its channels and ledger, the
demo's local destinations, and the stock story's supplier catalogue and supplier API.

Everything but the playbook path is imported lazily: ``python -m resources.local_receivers`` must
neither import its own module twice nor pay for importing Dagster and the library before its CRM
receiver needs the library's ``verify_signature``.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resources.channels import (
        churn_channels,
        crm_db_path,
        default_crm_url,
        default_ledger_url,
        default_smtp_port,
        mailbox_dir,
        var_dir,
    )
    from resources.local_receivers import CrmReceiver, SmtpSink
    from resources.supplier_api import SupplierApi
    from resources.suppliers import SupplierCatalogue, cheapest_feasible_offers, generate_catalogue

CHURN_PLAYBOOK_PATH = Path(__file__).with_name("churn_playbook.yaml")

_LAZY = {
    "CrmReceiver": "resources.local_receivers",
    "SmtpSink": "resources.local_receivers",
    "SupplierApi": "resources.supplier_api",
    "SupplierCatalogue": "resources.suppliers",
    "cheapest_feasible_offers": "resources.suppliers",
    "generate_catalogue": "resources.suppliers",
    "churn_channels": "resources.channels",
    "crm_db_path": "resources.channels",
    "default_crm_url": "resources.channels",
    "default_ledger_url": "resources.channels",
    "default_smtp_port": "resources.channels",
    "mailbox_dir": "resources.channels",
    "var_dir": "resources.channels",
}

__all__ = [
    "CHURN_PLAYBOOK_PATH",
    "CrmReceiver",
    "SmtpSink",
    "SupplierApi",
    "SupplierCatalogue",
    "cheapest_feasible_offers",
    "churn_channels",
    "crm_db_path",
    "default_crm_url",
    "default_ledger_url",
    "default_smtp_port",
    "generate_catalogue",
    "mailbox_dir",
    "var_dir",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'resources' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
