"""A promotion that waits for a person: ``Experiment(promotion_approvers=[...])``.

When the stopping rule picks a winner, the experiment asks instead of promoting: an approval
request (the same ledger table, decisions and ``autoexec approve`` / ``reject`` commands as a
workflow's approval gate) whose payload is the evidence, bound to its digest. Until it is
decided the experiment keeps running under its weights. An approval promotes the winner at the
next update; a rejection, or the request's expiry, keeps the experiment running and is recorded;
the same winner is not proposed again (its request id is fixed), another one may be.
"""

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from autoexec_dagster.experiments.experiment import Experiment
from autoexec_dagster.keys import SEP
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import APPROVED, EXPIRED, PENDING, REJECTED

PROMOTION_STEP = "promote"
EXPERIMENT_WORKFLOW = "experiment"
EXPIRES_AFTER = timedelta(days=7)


def promotion_approval_id(*, playbook: str, experiment: str, winner: str) -> str:
    """The request's id: one per experiment and proposed winner."""
    text = SEP.join(("promotion", playbook, experiment, winner))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def request_promotion(
    ledger: ActionLedger,
    *,
    playbook: str,
    playbook_version: str,
    experiment: Experiment,
    rule: str,
    winner: str,
    evidence: Mapping[str, Any],
    now: datetime,
) -> tuple[str, bool]:
    """Ask the experiment's promotion approvers; returns the request id and whether it is new."""
    approval_id = promotion_approval_id(
        playbook=playbook, experiment=experiment.name, winner=winner
    )
    payload = {"experiment": experiment.name, "promote": winner, "evidence": dict(evidence)}
    encoded = json.dumps(payload, sort_keys=True, default=str).encode()
    inserted = ledger.request_approvals(
        [
            {
                "approval_id": approval_id,
                "instance_id": approval_id,
                "playbook": playbook,
                "playbook_version": playbook_version,
                "workflow": EXPERIMENT_WORKFLOW,
                "insight": f"experiment:{experiment.name}",
                "partition_key": "",
                "entity_id": winner,
                "rule": rule,
                "step": PROMOTION_STEP,
                "approvers": list(experiment.promotion_approvers),
                "min_approvals": 1,
                "payload": payload,
                "digest": hashlib.sha256(encoded).hexdigest(),
                "value": None,
                "condition": f"promote {winner} in experiment {experiment.name}",
                "on_expiry": "reject",
                "requested_at": now,
                "expires_at": now + EXPIRES_AFTER,
            }
        ]
    )
    return approval_id, bool(inserted)


def promotion_decision(ledger: ActionLedger, approval_id: str, *, now: datetime) -> dict[str, Any]:
    """The request's status (pending, approved, rejected, expired), who decided and the note.

    A pending request past its expiry is closed as expired here (the decision and the expiry
    cannot both win: the close is guarded on "still pending").
    """
    row = ledger.approval_rows([approval_id]).get(approval_id)
    if row is None:
        return {"status": REJECTED, "decided_by": None, "note": "the request is gone"}
    expires = row["expires_at"]
    if row["status"] == PENDING and expires is not None and expires <= now:
        closed = ledger.close_approvals(
            [approval_id], status=EXPIRED, by="autoexec", note="nobody decided in time"
        )
        if closed:
            row = {**row, "status": EXPIRED, "decided_by": "autoexec", "decision_note": None}
        else:
            row = ledger.approval_rows([approval_id])[approval_id]
    status = row["status"]
    if status not in (PENDING, APPROVED, REJECTED, EXPIRED):
        status = REJECTED
    return {
        "status": status,
        "decided_by": row.get("decided_by"),
        "note": row.get("decision_note"),
        "decided_at": row.get("decided_at"),
    }
