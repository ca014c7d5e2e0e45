"""Recovering actions a dead worker left ``sending``: resend at-least-once, escalate at-most-once.

Everything recovery needs comes from the ledger row itself (where the action comes from and its
reserved request data), so any step that holds idempotency keys can recover them: the delivery of
approved escalations, and each shard of a sharded partition, which holds keys but not the plan.
"""

from collections.abc import Mapping
from typing import Any

from autoexec_dagster.executor.recording import entity_data
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import IN_DOUBT


def escalation_context_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of the escalation opened for an action row (see ``approved_action_rows``)."""
    return {
        "playbook": row["playbook"],
        "playbook_version": row["playbook_version"],
        "insight": row["insight"],
        "partition_key": row["partition_key"],
        "entity_id": row["entity_id"],
        "rule": row["rule"],
        "data": entity_data(row["data"]),
    }


def recover_in_doubt(
    ledger: ActionLedger,
    to_send: dict[str, list[str]],
    report: ExecutionReport,
    *,
    reason: str,
    what: str,
    log: Any,
) -> list[str]:
    """Recover the keys of ``to_send`` that a dead worker holds, in place.

    A holder is dead when its lease ran out or, on this machine, its process is gone. At-least-once
    actions become claimable again with the same key; at-most-once actions are escalated with
    ``reason`` and dropped from ``to_send``.

    Args:
        ledger: The action ledger.
        to_send: Keys per action; escalated keys are removed from it.
        report: ``in_doubt_recovered`` and the escalations are counted here.
        reason: The escalation reason of an at-most-once action.
        what: What the actions are, for the log line ("action(s)", "approved action(s)").
        log: A ``logging.Logger`` or Dagster's ``context.log``.

    Returns:
        The recovered keys that are to be resent.
    """
    keys = [key for action_keys in to_send.values() for key in action_keys]
    recovered = ledger.recover(keys)
    if not recovered:
        return []
    report.in_doubt_recovered += len(recovered)
    at_most_once = [k for k, mode in recovered.items() if mode == "at_most_once"]
    if at_most_once:
        rows = ledger.approved_action_rows(at_most_once, states=(IN_DOUBT,))
        escalated = ledger.escalate_actions(
            at_most_once,
            kind="in_doubt",
            reason=reason,
            context={key: escalation_context_of(row) for key, row in rows.items()},
            from_states=(IN_DOUBT,),
        )
        report.escalated += len(escalated)
        report.note_escalation(reason, len(escalated))
        gone = set(escalated)
        for action, action_keys in to_send.items():
            to_send[action] = [k for k in action_keys if k not in gone]
    log.warning(
        f"{report.playbook} [{report.partition_key or '-'}]: {len(recovered)} {what} were in "
        f"doubt after a crash; {len(recovered) - len(at_most_once)} are resent with the same key"
    )
    return [k for k, mode in recovered.items() if mode != "at_most_once"]
