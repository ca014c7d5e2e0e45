"""The action ledger: the durable record of every action, the outbox and the escalation queue.

:class:`ActionLedger` is one object over the ledger's parts, each in its own module:

- :mod:`~autoexec_dagster.ledger.engine`: the engine, SQLite settings, schema set-up, migrations;
- :mod:`~autoexec_dagster.ledger.outbox`: reserve, claim, heartbeat, complete, recover;
- :mod:`~autoexec_dagster.ledger.escalations`: the escalation queue, its case dedupe and decisions;
- :mod:`~autoexec_dagster.ledger.suppressions`: entities kept out of a playbook for a while;
- :mod:`~autoexec_dagster.ledger.controls`: the kill switch;
- :mod:`~autoexec_dagster.ledger.workflow_store`: workflow instances, claimed when due;
- :mod:`~autoexec_dagster.ledger.approvals`: approval requests and each approver's decision;
- :mod:`~autoexec_dagster.ledger.experiment_store`: experiments, sticky assignments, exposures
  and outcomes;
- :mod:`~autoexec_dagster.ledger.queries`: the reads that metadata and the command line use.
"""

from autoexec_dagster.ledger.approvals import ApprovalStore
from autoexec_dagster.ledger.budget_store import BudgetStore
from autoexec_dagster.ledger.controls import Controls
from autoexec_dagster.ledger.engine import DEFAULT_LEDGER_URL
from autoexec_dagster.ledger.escalations import Escalations
from autoexec_dagster.ledger.experiment_store import ExperimentStore
from autoexec_dagster.ledger.liveness import new_worker_id
from autoexec_dagster.ledger.outbox import Outbox, Outcome, WorkItem
from autoexec_dagster.ledger.queries import LedgerQueries
from autoexec_dagster.ledger.suppressions import Suppressions
from autoexec_dagster.ledger.workflow_store import WorkflowStore

__all__ = ["DEFAULT_LEDGER_URL", "ActionLedger", "Outcome", "WorkItem", "new_worker_id"]


class ActionLedger(
    BudgetStore,
    Outbox,
    Suppressions,
    Escalations,
    Controls,
    WorkflowStore,
    ApprovalStore,
    ExperimentStore,
    LedgerQueries,
):
    """Durable record of every action, backed by SQLite (default) or PostgreSQL.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:///ledger.db`` or
            ``postgresql+psycopg://user@host/db``. The schema is created or migrated on open.
        echo: Log SQL statements (debugging).
        clock: The time workflows are due by (a callable returning an aware datetime); defaults
            to the real UTC time. Tests move it forward instead of sleeping.

    Raises:
        LedgerError: The URL is malformed, its driver is missing, or the database cannot be opened
            or migrated. The message masks any password. Every later database error is also
            raised as a LedgerError that names the operation and the cause.
    """
