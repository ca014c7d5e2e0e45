"""``<playbook>/approvals``: a partition's approval requests as people see them in the Dagster UI.

Materialized by every execution run of a playbook with approval gates (pending: count, total
value, oldest age; decided: by the rule, by people, rejected, expired, void) and observed again,
without a run, whenever a person decides from the command line or a link, so the UI shows the
queue as it is now. The ``<playbook>_approval_sla`` check warns when a pending request of the
partition has waited longer than its step's ``sla``; the gate makes its instance due at the SLA
time, so a run evaluates the check then, not only when something else happens.
"""

import warnings
from datetime import datetime
from typing import Any

import dagster as dg
import pandas as pd

from autoexec_dagster.dagster.metadata import table_preview
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import APPROVED, EXPIRED, PENDING, REJECTED, VOID
from autoexec_dagster.playbook import Playbook

APPROVALS = "approvals"
RULE = "rule"


def has_approval_steps(playbook: Playbook) -> bool:
    """Whether any workflow of the playbook has an approval gate."""
    return any(
        step.kind == "approval"
        for workflow in playbook.workflows.values()
        for step in [*workflow.steps, *workflow.on_failure_steps]
    )


def approval_sla_check_name(playbook: Playbook) -> str:
    """``<playbook>_approval_sla``."""
    return f"{playbook.name}_approval_sla"


def approvals_summary(
    ledger: ActionLedger, *, playbook: str, partition_key: str, now: datetime
) -> dict[str, Any]:
    """Counts and values of a partition's approval requests, as plain data.

    Returns:
        pending, pending_value, oldest_pending_hours, sla_overdue, and per outcome (approved by
        the rule, approved by people, rejected, expired, void) the count and the value.
    """
    rows = ledger.approval_counts(playbook=playbook, partition_key=partition_key)
    summary: dict[str, Any] = {
        "pending": 0,
        "pending_value": 0.0,
        "oldest_pending_hours": 0.0,
        "sla_overdue": 0,
    }
    for status in (REJECTED, EXPIRED, VOID):
        summary[status] = 0
        summary[f"{status}_value"] = 0.0
    for row in rows:
        if row["status"] == PENDING:
            summary["pending"] = row["count"]
            summary["pending_value"] = row["value"]
            oldest = row["oldest_requested_at"]
            if oldest is not None:
                summary["oldest_pending_hours"] = round((now - oldest).total_seconds() / 3600, 2)
        elif row["status"] != APPROVED:
            summary[row["status"]] = row["count"]
            summary[f"{row['status']}_value"] = row["value"]
    approved = ledger.approvals(playbook=playbook, partition_key=partition_key, status=APPROVED)
    by_rule = approved["decided_via"] == RULE
    summary["approved_by_rule"] = int(by_rule.sum())
    summary["approved_by_rule_value"] = float(approved.loc[by_rule, "value"].fillna(0).sum())
    summary["approved_by_people"] = int((~by_rule).sum())
    summary["approved_by_people_value"] = float(approved.loc[~by_rule, "value"].fillna(0).sum())
    if summary["pending"]:
        pending = ledger.pending_approvals(playbook=playbook, partition_key=partition_key)
        due = pending["sla_due_at"].dropna()
        summary["sla_overdue"] = int((due <= pd.Timestamp(now)).sum())
    # Values are money or quantities: a sum of floats shows as 16295.939999999999 otherwise.
    for key, value in summary.items():
        if key.endswith("_value"):
            summary[key] = round(float(value), 2)
    return summary


def approvals_metadata(
    ledger: ActionLedger,
    *,
    playbook: Playbook,
    partition_key: str,
    now: datetime,
    max_rows: int = 20,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(summary, metadata)`` of ``<playbook>/approvals`` for one partition.

    The metadata holds every count and value of :func:`approvals_summary` (so the UI plots them
    over partitions) and a preview of the oldest pending requests.
    """
    summary = approvals_summary(
        ledger, playbook=playbook.name, partition_key=partition_key, now=now
    )
    metadata: dict[str, Any] = {
        key: dg.MetadataValue.float(value) if isinstance(value, float) else value
        for key, value in summary.items()
    }
    if summary["pending"]:
        pending = ledger.pending_approvals(
            playbook=playbook.name, partition_key=partition_key, limit=max_rows
        )
        view = pd.DataFrame(
            {
                "approval": pending["approval_id"].str[:12],
                "entity_id": pending["entity_id"],
                "step": pending["step"],
                "value": pending["value"],
                "approvers": pending["approvers"],
                "waiting_hours": (
                    (pd.Timestamp(now) - pending["requested_at"]).dt.total_seconds() / 3600
                ).round(1),
                "expires_at": pending["expires_at"].astype(str),
            }
        )
        metadata["pending_preview"] = table_preview(
            view, personal_columns=playbook.personal_columns, max_rows=max_rows
        )
    metadata["how_to_decide"] = dg.MetadataValue.md(
        f"`autoexec approvals --playbook {playbook.name} --partition {partition_key or '-'}`, "
        f"then `autoexec approve KEY --by NAME` or `autoexec reject KEY --by NAME --note WHY`; "
        "or the signed links in the approvers' messages."
    )
    return summary, metadata


def build_approval_sla_check(
    *,
    playbook: Playbook,
    approvals_key: dg.AssetKey,
    partitions_def: dg.PartitionsDefinition | None,
    ledger: Any,
) -> dg.AssetChecksDefinition:
    """The non-blocking check that warns when a pending request has waited past its SLA.

    Args:
        playbook: The playbook (with at least one approval gate).
        approvals_key: The ``<playbook>/approvals`` asset.
        partitions_def: Its partitions.
        ledger: The :class:`~autoexec_dagster.dagster.ledger_resource.LedgerHandle`.
    """
    name = approval_sla_check_name(playbook)
    slas = sorted(
        {
            str(step.sla)
            for workflow in playbook.workflows.values()
            for step in workflow.steps
            if step.kind == "approval" and step.sla is not None
        }
    )
    with warnings.catch_warnings():
        # Per-partition checks are a preview API in Dagster 1.13 (see insight_checks).
        warnings.simplefilter("ignore", dg.PreviewWarning)
        spec = dg.AssetCheckSpec(
            name,
            asset=approvals_key,
            blocking=False,
            partitions_def=partitions_def,
            description=f"No approval request of playbook {playbook.name!r} waits past its "
            f"step's SLA ({', '.join(slas) or 'no SLA set'}).",
        )

    @dg.multi_asset_check(
        name=name,
        specs=[spec],
        description=f"Approval SLA of playbook {playbook.name!r}.",
    )
    def _sla(context: dg.AssetCheckExecutionContext):
        partition = context.partition_key if context.has_partition_key else ""
        book: ActionLedger = ledger.get()
        now = book.clock()
        summary = approvals_summary(book, playbook=playbook.name, partition_key=partition, now=now)
        overdue = int(summary["sla_overdue"])
        yield dg.AssetCheckResult(
            check_name=name,
            asset_key=approvals_key,
            passed=overdue == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "sla_overdue": overdue,
                "pending": int(summary["pending"]),
                "oldest_pending_hours": dg.MetadataValue.float(summary["oldest_pending_hours"]),
            },
            description=(
                f"{overdue:,} pending approval(s) waited past their SLA; the oldest for "
                f"{summary['oldest_pending_hours']:.1f} h"
                if overdue
                else "every pending approval is within its SLA"
            ),
        )

    return _sla
