"""What an advance of workflow instances did, for logs, metadata and tests."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class WorkflowReport:
    """What one call of :func:`advance_workflows` (or a workflow-starting ``execute_plan``) did.

    Attributes:
        playbook: Playbook name.
        partition_key: The partition advanced, or None for every partition.
        started: Instances started by this call (by ``execute_plan``).
        advanced: Instances this call claimed and moved.
        steps_delivered: Step attempts delivered (polls count each attempt).
        steps_skipped: Steps skipped because their ``when`` did not hold.
        waiting: Instances left waiting at the end of this call (a poll interval or a timer).
        running: Instances left due but not finished (a step held by another worker).
        succeeded: Instances that finished every step in this call.
        failed: Instances that failed for good in this call (each is also escalated).
        rejected: Instances a person (or an approval's expiry) rejected in this call.
        approvals_requested: Approval requests this call opened (each waits for people).
        approved_by_rule: Instances whose approval gate passed because ``approve_when`` did not
            hold.
        approved: Instances that went on because people approved (or the expiry did).
        expired: Approval requests that expired unanswered in this call.
        notifications: Approver notifications delivered (failures are in ``errors``).
        escalated: Entities escalated with the evidence of their workflow.
        next_due: When the earliest instance this call left waiting is due.
        by_step: Per step: delivered, skipped, failed, waiting counts.
        errors: A bounded sample of failure messages.
        duration_seconds: Wall time of the call.
    """

    playbook: str
    partition_key: str | None = None
    started: int = 0
    advanced: int = 0
    steps_delivered: int = 0
    steps_skipped: int = 0
    waiting: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    approvals_requested: int = 0
    approved_by_rule: int = 0
    approved: int = 0
    expired: int = 0
    notifications: int = 0
    escalated: int = 0
    next_due: datetime | None = None
    by_step: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0

    def count(self, step: str, outcome: str, n: int = 1) -> None:
        """Add ``n`` to the per-step tally of ``outcome``."""
        tally = self.by_step.setdefault(step, {})
        tally[outcome] = tally.get(outcome, 0) + n

    def note_error(self, message: str) -> None:
        """Keep a bounded sample of failure messages."""
        if len(self.errors) < 20:
            self.errors.append(message)

    def add(self, other: "WorkflowReport") -> None:
        """Add what another worker's advance of the same partition did (a sibling shard's).

        Counts add up, the earliest ``next_due`` wins, and the durations of workers that ran at
        the same time are not summed: the longest is kept.
        """
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.next_due is not None and (self.next_due is None or other.next_due < self.next_due):
            self.next_due = other.next_due
        for step, tally in other.by_step.items():
            for outcome, n in tally.items():
                self.count(step, outcome, n)
        for message in other.errors:
            self.note_error(message)
        self.duration_seconds = max(self.duration_seconds, other.duration_seconds)

    def as_dict(self) -> dict[str, Any]:
        """Everything in the report as plain data."""
        return {
            "playbook": self.playbook,
            "partition_key": self.partition_key,
            "started": self.started,
            "advanced": self.advanced,
            "steps_delivered": self.steps_delivered,
            "steps_skipped": self.steps_skipped,
            "waiting": self.waiting,
            "running": self.running,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "rejected": self.rejected,
            "approvals_requested": self.approvals_requested,
            "approved_by_rule": self.approved_by_rule,
            "approved": self.approved,
            "expired": self.expired,
            "notifications": self.notifications,
            "escalated": self.escalated,
            "next_due": self.next_due.isoformat() if self.next_due else None,
            "by_step": {k: dict(v) for k, v in self.by_step.items()},
            "errors": list(self.errors),
            "duration_seconds": self.duration_seconds,
        }


_COUNTS = (
    "advanced",
    "steps_delivered",
    "steps_skipped",
    "waiting",
    "running",
    "succeeded",
    "failed",
    "rejected",
    "approvals_requested",
    "approved_by_rule",
    "approved",
    "expired",
    "notifications",
    "escalated",
)
