"""The report of one plan execution: counts, rates and a human summary."""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from autoexec_dagster.workflows.report import WorkflowReport


@dataclass
class ExecutionReport:
    """What :func:`execute_plan` did with one plan.

    Counts are of entities handled by this call; ``already_done`` counts those a previous call had
    finished, so a re-run of a finished plan reports only ``already_done``.

    Attributes:
        playbook: Playbook name.
        playbook_version: Effective playbook version.
        insight: Insight asset key.
        partition_key: Insight partition.
        run_id: Run that executed the plan, if given.
        dry_run: True when nothing was sent.
        total: Entities in the plan.
        flagged: Entities any rule acted on, escalated or held out.
        succeeded: Actions delivered.
        failed: Actions that failed permanently or ran out of attempts (each also escalated).
        escalated: Entities sent to the human queue by this call: by a rule, a guardrail, an
            open circuit or an in-doubt at-most-once action.
        workflows_started: Workflow instances started by this call (one per entity routed to a
            workflow; a re-run starts none).
        dry_run_workflows: Workflow starts recorded as "would have started" in dry-run mode.
        workflows: The :class:`~autoexec_dagster.workflows.advance.WorkflowReport` of the
            workflows this call advanced, or None when the playbook has none.
        approved_actions: The report of delivering the partition's proposed actions that people
            approved from the escalation queue, or None when no rule proposes one.
        still_open_escalations: Entities a rule escalates whose escalation by that rule is still
            open from an earlier partition (not opened again), counted by that partition.
        earlier_versions: When earlier runs of this partition used other playbook versions: the
            number of ledger rows each wrote. Only what this version adds was executed.
        held_out: Entities held out as the control group.
        skipped: Entities no rule acted on.
        already_done: Entities a previous execution had already finished.
        cooled_down: Actions skipped because the entity got the same action within the
            playbook's cooldown.
        over_budget: Actions skipped because a budget of the playbook was spent (per entity
            or per playbook, over every playbook sharing it).
        dry_run_actions: Actions recorded as "would have been sent" in dry-run mode.
        pending: Actions left unsent (paused, or claimed by another live worker).
        claimed_elsewhere: Actions another live worker was executing at the same time.
        retries: Attempts beyond the first.
        in_doubt_recovered: Actions found in doubt after a crash and retried or escalated.
        blocked_reason: Set when a guardrail stopped the whole batch.
        paused_reason: Set when the kill switch stopped the batch.
        circuit_opened: Actions whose channel circuit opened.
        duration_seconds: Wall time of the call.
        by_action: Outcome counts per action.
        escalation_reasons: Count of escalations per reason.
        errors: A bounded sample of error messages.
    """

    playbook: str
    playbook_version: str
    insight: str
    partition_key: str
    run_id: str | None = None
    dry_run: bool = False
    total: int = 0
    flagged: int = 0
    succeeded: int = 0
    failed: int = 0
    escalated: int = 0
    workflows_started: int = 0
    dry_run_workflows: int = 0
    workflows: Any = None
    approved_actions: Any = None
    still_open_escalations: dict[str, int] = field(default_factory=dict)
    earlier_versions: dict[str, int] = field(default_factory=dict)
    held_out: int = 0
    skipped: int = 0
    already_done: int = 0
    cooled_down: int = 0
    over_budget: int = 0
    dry_run_actions: int = 0
    pending: int = 0
    claimed_elsewhere: int = 0
    retries: int = 0
    in_doubt_recovered: int = 0
    blocked_reason: str | None = None
    paused_reason: str | None = None
    circuit_opened: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0
    by_action: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    escalation_reasons: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def count(self, action: str, outcome: str, n: int = 1) -> None:
        """Add ``n`` to the per-action tally of ``outcome``."""
        tally = self.by_action.setdefault(action, {})
        tally[outcome] = tally.get(outcome, 0) + n

    def note_escalation(self, reason: str, n: int = 1) -> None:
        """Tally an escalation reason."""
        self.escalation_reasons[reason] = self.escalation_reasons.get(reason, 0) + n

    def note_still_open(self, partition_key: str) -> None:
        """Count an escalation that is still open from ``partition_key``."""
        self.still_open_escalations[partition_key] = (
            self.still_open_escalations.get(partition_key, 0) + 1
        )

    def add_delivery(self, other: "ExecutionReport") -> None:
        """Add what another worker delivered of the same partition (a shard's report).

        Only what delivery counts is added (sent, failed, escalated by a channel or a crash,
        retries, claims, pauses, circuits); what routing and recording counted stays with the
        report of the step that recorded the plan.
        """
        for name in _DELIVERY_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for action, tally in other.by_action.items():
            for outcome, n in tally.items():
                self.count(action, outcome, n)
        for reason, n in other.escalation_reasons.items():
            self.note_escalation(reason, n)
        for message in other.errors:
            self.note_error(message)
        self.circuit_opened += [a for a in other.circuit_opened if a not in self.circuit_opened]
        self.paused_reason = self.paused_reason or other.paused_reason
        if other.workflows is not None:
            if self.workflows is None:
                # A report of its own: adding the next one must not change ``other``'s.
                self.workflows = WorkflowReport(
                    playbook=other.workflows.playbook,
                    partition_key=other.workflows.partition_key,
                )
            self.workflows.add(other.workflows)

    @property
    def still_open(self) -> int:
        """Entities whose escalation is still open from an earlier partition."""
        return sum(self.still_open_escalations.values())

    def note_error(self, message: str) -> None:
        """Keep a bounded sample of error messages."""
        if len(self.errors) < 20:
            self.errors.append(message)

    @property
    def autonomous(self) -> int:
        """Flagged entities handled without a person: delivered, would-be-delivered, or left
        alone on purpose because the same action went out recently or a budget was spent."""
        return self.succeeded + self.dry_run_actions + self.cooled_down + self.over_budget

    @property
    def autonomy_rate(self) -> float | None:
        """Share of flagged entities handled without a person (holdouts excluded)."""
        denominator = self.autonomous + self.escalated + self.failed
        return None if denominator == 0 else self.autonomous / denominator

    @property
    def throughput(self) -> float:
        """Actions finished per second in this call."""
        done = self.succeeded + self.failed + self.dry_run_actions
        return done / self.duration_seconds if self.duration_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """No guardrail, pause or failure stopped any action."""
        return not (self.blocked_reason or self.paused_reason or self.failed or self.pending)

    def counts(self) -> dict[str, int]:
        """The headline counts as a flat mapping."""
        return {
            "total": self.total,
            "flagged": self.flagged,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "escalated": self.escalated,
            "still_open": self.still_open,
            "workflows_started": self.workflows_started,
            "held_out": self.held_out,
            "skipped": self.skipped,
            "already_done": self.already_done,
            "cooled_down": self.cooled_down,
            "over_budget": self.over_budget,
            "dry_run": self.dry_run_actions,
            "pending": self.pending,
            "retries": self.retries,
        }

    def summary_markdown(self) -> str:
        """A Markdown summary for people: what was done, what needs them, what went wrong."""
        rate = self.autonomy_rate
        mode = " (dry run: nothing was sent)" if self.dry_run else ""
        lines = [
            f"### {self.playbook} · partition `{self.partition_key or '-'}`{mode}",
            "",
            f"- **{self.flagged:,}** of {self.total:,} entities flagged",
            f"- **{self.autonomous:,}** handled autonomously"
            + (f" (autonomy rate {rate:.1%})" if rate is not None else ""),
            f"- **{self.escalated:,}** escalated to a person",
            *(
                [
                    f"- {self.still_open:,} still waiting for a person from earlier partitions "
                    + "("
                    + ", ".join(
                        f"{n:,} from `{p}`" for p, n in sorted(self.still_open_escalations.items())
                    )
                    + "): not escalated again"
                ]
                if self.still_open
                else []
            ),
            f"- {self.held_out:,} held out as control group, {self.skipped:,} skipped",
            f"- {self.failed:,} failed, {self.retries:,} retries",
        ]
        flow = self.workflows
        if self.workflows_started or (flow is not None and flow.advanced):
            line = f"- {self.workflows_started:,} workflow(s) started"
            if flow is not None:
                line += (
                    f"; {flow.succeeded:,} finished, {flow.failed:,} failed and escalated, "
                    f"{flow.waiting:,} waiting"
                )
                if flow.next_due is not None:
                    line += f" (next due {flow.next_due:%Y-%m-%d %H:%M:%S} UTC)"
            lines.append(line)
        if self.cooled_down:
            lines.append(
                f"- {self.cooled_down:,} not repeated: same action delivered recently (cooldown)"
            )
        if self.over_budget:
            lines.append(f"- {self.over_budget:,} not sent: a budget was spent (see the ledger)")
        if self.already_done:
            lines.append(f"- {self.already_done:,} already done by an earlier run (nothing resent)")
        if self.earlier_versions:
            earlier = ", ".join(f"`{v}`" for v in sorted(self.earlier_versions))
            lines.append(
                f"- playbook version `{self.playbook_version}`; earlier runs of this partition "
                f"used {earlier}: only what this version adds was executed"
            )
        if self.pending:
            lines.append(f"- {self.pending:,} pending (not sent in this run)")
        if self.blocked_reason:
            lines += ["", f"**Batch blocked by a guardrail:** {self.blocked_reason}"]
        if self.paused_reason:
            lines += ["", f"**Paused:** {self.paused_reason}"]
        if self.circuit_opened:
            lines += ["", f"**Circuit opened** for: {', '.join(self.circuit_opened)}"]
        if self.by_action:
            lines += ["", "| action | " + " | ".join(_OUTCOMES) + " |"]
            lines.append("|---" * (len(_OUTCOMES) + 1) + "|")
            for action, tally in sorted(self.by_action.items()):
                cells = " | ".join(f"{tally.get(o, 0):,}" for o in _OUTCOMES)
                lines.append(f"| {action} | {cells} |")
        if self.escalation_reasons:
            lines += ["", "**Escalations by reason**", ""]
            for reason, n in sorted(self.escalation_reasons.items(), key=lambda kv: -kv[1]):
                lines.append(f"- {n:,}: {reason}")
        if self.errors:
            lines += ["", "**Errors (sample)**", ""]
            lines += [f"- `{e}`" for e in self.errors[:5]]
        lines += ["", f"Took {self.duration_seconds:.2f} s ({self.throughput:,.0f} actions/s)."]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Everything in the report as plain data (JSON-serialisable)."""
        return {
            "playbook": self.playbook,
            "playbook_version": self.playbook_version,
            "insight": self.insight,
            "partition_key": self.partition_key,
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            **self.counts(),
            "claimed_elsewhere": self.claimed_elsewhere,
            "in_doubt_recovered": self.in_doubt_recovered,
            "autonomy_rate": self.autonomy_rate,
            "blocked_reason": self.blocked_reason,
            "paused_reason": self.paused_reason,
            "circuit_opened": list(self.circuit_opened),
            "duration_seconds": self.duration_seconds,
            "throughput": self.throughput,
            "by_action": {k: dict(v) for k, v in self.by_action.items()},
            "escalation_reasons": dict(self.escalation_reasons),
            "still_open_escalations": dict(self.still_open_escalations),
            "earlier_versions": dict(self.earlier_versions),
            "workflows": self.workflows.as_dict() if self.workflows is not None else None,
            "errors": list(self.errors),
        }


_OUTCOMES = (
    "succeeded",
    "failed",
    "escalated",
    "held_out",
    "cooldown",
    "over_budget",
    "dry_run",
    "already_done",
)

_DELIVERY_COUNTS = (
    "succeeded",
    "failed",
    "escalated",
    "pending",
    "claimed_elsewhere",
    "retries",
    "in_doubt_recovered",
)
