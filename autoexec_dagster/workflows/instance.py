"""A claimed workflow instance as an advance moves it: its position, outputs, log and data."""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from autoexec_dagster.ledger import payload
from autoexec_dagster.ledger.schema import FAILED, FAILING, REJECTED, SUCCEEDED
from autoexec_dagster.workflows.workflow import Workflow

# Step outcomes kept per instance (the evidence of a failure); older ones are dropped.
MAX_LOG = 200


@dataclass
class Instance:
    """A claimed workflow instance while it is advanced (mirrors its ledger row)."""

    instance_id: str
    playbook_version: str
    workflow: str
    insight: str
    partition_key: str
    entity_id: str
    rule: str
    state: str
    step_index: int
    attempt: int
    step_started_at: datetime | None
    next_due: datetime | None
    outputs: dict[str, Any]
    log: list[dict[str, Any]]
    data: dict[str, Any]
    error: str | None = None
    finished_at: datetime | None = None
    # Stop moving this instance in this call (waiting, finished, or its step is held elsewhere).
    parked: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Instance":
        """The instance as ``WorkflowStore.claim_instances`` returned it."""
        return cls(
            instance_id=row["instance_id"],
            playbook_version=row["playbook_version"],
            workflow=row["workflow"],
            insight=row["insight"],
            partition_key=row["partition_key"],
            entity_id=row["entity_id"],
            rule=row["rule"],
            state=row["state"],
            step_index=int(row["step_index"]),
            attempt=int(row["attempt"]),
            step_started_at=aware(row["step_started_at"]),
            next_due=aware(row["next_due"]),
            outputs=payload.loads(row["outputs"]),
            log=list(payload.loads_value(row["log"], [])),
            data=payload.loads(row["data"]),
        )

    def saved(self, workflow: Workflow | None) -> dict[str, Any]:
        """The ledger columns an advance writes back (see ``WorkflowStore.save_instances``)."""
        finished = self.state in (SUCCEEDED, FAILED, REJECTED) or workflow is None
        current = None
        if workflow is not None and not finished:
            steps = workflow.on_failure_steps if self.state == FAILING else workflow.steps
            current = steps[self.step_index].name if self.step_index < len(steps) else None
        return {
            "instance_id": self.instance_id,
            "state": self.state,
            "step": None if finished else current,
            "step_index": self.step_index,
            "attempt": self.attempt,
            "step_started_at": self.step_started_at,
            "next_due": None if finished else self.next_due,
            "outputs": payload.dumps(self.outputs),
            "log": payload.dumps_value(self.log[-MAX_LOG:]),
            "error": self.error,
            "finished_at": self.finished_at,
        }


def aware(value: Any) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite hands back naive ones)."""
    if value is None:
        return None
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize(UTC)
    return stamp.to_pydatetime()
