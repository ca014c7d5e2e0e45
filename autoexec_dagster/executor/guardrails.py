"""Guardrails checked before anything is sent: blast radius, max actions, cooldown.

A blocked batch is escalated as one case, keyed by its partition, so it escalates once and a
corrected insight for the same partition can still be executed.
"""

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pandas as pd

from autoexec_dagster.keys import BATCH_ENTITY, batch_key
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import PLAN_ATTRS


def guardrail_violation(
    playbook: Playbook, *, total: int, flagged: int, actions: int
) -> str | None:
    """Why the batch must not run (blast radius or max actions), or None when it may."""
    limits = playbook.guardrails
    if total and flagged / total > limits.max_flagged_fraction:
        return (
            f"{flagged:,} of {total:,} entities flagged ({flagged / total:.1%}), above the "
            f"playbook's max_flagged_fraction of {limits.max_flagged_fraction:.1%}; a model or data "
            "fault is likelier than a real mass event, so nothing was executed"
        )
    if limits.max_actions is not None and actions > limits.max_actions:
        return (
            f"{actions:,} actions exceed the playbook's max_actions of {limits.max_actions:,}; "
            "nothing was executed"
        )
    return None


def escalate_batch(plan: pd.DataFrame, *, ledger: ActionLedger, reason: str) -> bool:
    """Record a blocked batch as one escalation, keyed by partition so it escalates once.

    Nothing is sent and no action is reserved, so a corrected insight for the same partition
    can still be executed; the escalation tells a person why this batch was not.

    Args:
        plan: The plan, keyed for its partition (see :func:`autoexec_dagster.route`).
        ledger: The action ledger.
        reason: Why the batch was blocked.

    Returns:
        True when the escalation was opened now, False when it already existed.
    """
    info = plan.attrs[PLAN_ATTRS]
    partition = info["partition_key"] or ""
    decisions = plan["decision"].astype(str)
    flagged = plan[decisions != "skip"]
    inserted = ledger.open_escalations(
        [
            {
                "idempotency_key": batch_key(insight=info["insight"], partition_key=partition),
                "playbook": info["playbook"],
                "playbook_version": info["playbook_version"],
                "insight": info["insight"],
                "partition_key": partition,
                "entity_id": BATCH_ENTITY,
                "rule": "(guardrail)",
                "kind": "guardrail",
                "reason": reason,
                "data": {
                    "total": len(plan),
                    "flagged": len(flagged),
                    "by_decision": {str(k): int(v) for k, v in decisions.value_counts().items()},
                    "sample_entity_ids": flagged["entity_id"].astype(str).tolist()[:100],
                },
            }
        ]
    )
    return bool(inserted)


def cooldown_lookup(
    plan: pd.DataFrame, *, playbook: Playbook, ledger: ActionLedger, partition_key: str
) -> Mapping[tuple[str, str], datetime]:
    """When each acting (entity, action) last succeeded in another partition within the cooldown,
    and when each entity routed to a workflow last started it there (keyed
    ``(entity, "workflow:<name>")``): a SKU short on two days gets one purchase order."""
    days = playbook.guardrails.cooldown_days
    decisions = plan["decision"].astype(str)
    acting = plan[decisions == "act"]
    starting = plan[decisions == "workflow"]
    if not days or (acting.empty and starting.empty):
        return {}
    found: dict[tuple[str, str], datetime] = {}
    if not acting.empty:
        # Deliveries are stamped with the real time they completed.
        found.update(
            ledger.recent_deliveries(
                playbook=playbook.name,
                entity_ids=acting["entity_id"].astype(str).tolist(),
                since=datetime.now(UTC) - timedelta(days=days),
                exclude_partition=partition_key,
            )
        )
    if not starting.empty:
        # Instances are stamped with the ledger's clock, the time workflows run by.
        found.update(
            ledger.recent_workflow_starts(
                playbook=playbook.name,
                entity_ids=starting["entity_id"].astype(str).tolist(),
                since=ledger.clock() - timedelta(days=days),
                exclude_partition=partition_key,
            )
        )
    return found
