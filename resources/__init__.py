"""Resources of the reference deployment: the churn playbook and the demo's local destinations.

The receivers are imported lazily so ``python -m resources.local_receivers`` does not import its
own module twice.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resources.local_receivers import CrmReceiver, SmtpSink

CHURN_PLAYBOOK_PATH = Path(__file__).with_name("churn_playbook.yaml")

__all__ = ["CHURN_PLAYBOOK_PATH", "CrmReceiver", "SmtpSink"]


def __getattr__(name: str) -> Any:
    if name in ("CrmReceiver", "SmtpSink"):
        from resources import local_receivers

        return getattr(local_receivers, name)
    raise AttributeError(f"module 'resources' has no attribute {name!r}")
