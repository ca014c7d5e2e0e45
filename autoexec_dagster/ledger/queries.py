"""Read queries over the ledger, as metadata, sensors and the command line use them.

Every query runs in a read transaction (no write lock on SQLite) and is bounded or aggregated, so
its cost does not grow with a partition's size where a caller shows only a preview.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa

from autoexec_dagster.budgets import BUDGET_DETAIL
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.engine import LedgerBase, chunks
from autoexec_dagster.ledger.schema import FINAL_STATES, OPEN

# Preview order: what needs a person first.
PREVIEW_STATES: tuple[str, ...] = (
    schema.FAILED,
    schema.ESCALATED,
    schema.IN_DOUBT,
    schema.SENDING,
    schema.RESERVED,
    schema.SUCCEEDED,
    schema.DRY_RUN,
    schema.HELD_OUT,
    schema.SKIPPED,
)
# Workflow preview order: what needs a person first, then what is still moving.
WORKFLOW_PREVIEW_STATES: tuple[str, ...] = (
    schema.FAILED,
    schema.FAILING,
    schema.WAITING,
    schema.RUNNING,
    schema.SUCCEEDED,
    schema.CANCELLED,
)
WORKFLOW_FAILED_KIND = "workflow_failed"


class LedgerQueries(LedgerBase):
    """Counts, listings and previews of actions and escalations."""

    def summary(
        self, *, playbook: str | None = None, partition_key: str | None = None
    ) -> pd.DataFrame:
        """Counts of actions per playbook, partition, decision, action and state."""
        t = schema.actions
        query = sa.select(
            t.c.playbook,
            t.c.partition_key,
            t.c.decision,
            t.c.action,
            t.c.state,
            sa.func.count().label("count"),
        ).group_by(t.c.playbook, t.c.partition_key, t.c.decision, t.c.action, t.c.state)
        if playbook is not None:
            query = query.where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        with self._read("summarise actions") as conn:
            return pd.read_sql(query.order_by(t.c.playbook, t.c.partition_key), conn)

    def state_counts(
        self, *, playbook: str | None = None, partition_key: str | None = None
    ) -> dict[str, int]:
        """Number of actions per state."""
        t = schema.actions
        query = sa.select(t.c.state, sa.func.count()).group_by(t.c.state)
        if playbook is not None:
            query = query.where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        with self._read("count actions") as conn:
            return {state: int(n) for state, n in conn.execute(query)}

    def actions(
        self,
        *,
        playbook: str | None = None,
        partition_key: str | None = None,
        states: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Action rows, newest first (without the pending request payload)."""
        t = schema.actions
        columns = [c for c in t.c if c.name != "payload"]
        query = sa.select(*columns).order_by(t.c.updated_at.desc())
        if playbook is not None:
            query = query.where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        if states is not None:
            query = query.where(t.c.state.in_(list(states)))
        if limit is not None:
            query = query.limit(limit)
        with self._read("list actions") as conn:
            return pd.read_sql(query, conn)

    def escalations(
        self,
        *,
        playbook: str | None = None,
        partition_key: str | None = None,
        status: str | None = OPEN,
        limit: int | None = None,
        kind: str | None = None,
    ) -> pd.DataFrame:
        """The escalation queue: what a person should look at, oldest first.

        Args:
            playbook: Only this playbook.
            partition_key: Only this partition.
            status: ``open``, ``resolved``, or None for both.
            limit: At most this many rows.
            kind: Only this kind (``rule``, ``workflow_failed``, ``guardrail``, ...).
        """
        t = schema.escalations
        query = sa.select(t).order_by(t.c.created_at, t.c.idempotency_key)
        if kind is not None:
            query = query.where(t.c.kind == kind)
        if playbook is not None:
            query = query.where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        if status is not None:
            query = query.where(t.c.status == status)
        if limit is not None:
            query = query.limit(limit)
        with self._read("list escalations") as conn:
            return pd.read_sql(query, conn)

    def recent_deliveries(
        self,
        *,
        playbook: str,
        entity_ids: Sequence[str],
        since: datetime,
        exclude_partition: str,
    ) -> dict[tuple[str, str], datetime]:
        """When each (entity, action) last succeeded since ``since``, in other partitions.

        Used by the cooldown guardrail.
        """
        t = schema.actions
        found: dict[tuple[str, str], datetime] = {}
        with self._read("read recent deliveries") as conn:
            for chunk in chunks(list(dict.fromkeys(entity_ids))):
                rows = conn.execute(
                    sa.select(t.c.entity_id, t.c.action, sa.func.max(t.c.completed_at))
                    .where(
                        t.c.playbook == playbook,
                        t.c.entity_id.in_(chunk),
                        t.c.state == schema.SUCCEEDED,
                        t.c.completed_at >= since,
                        t.c.partition_key != exclude_partition,
                    )
                    .group_by(t.c.entity_id, t.c.action)
                )
                for entity, action, last in rows:
                    found[(entity, action)] = last
        return found

    def count_final(self, keys: Sequence[str]) -> int:
        """How many of ``keys`` are in a final state."""
        t = schema.actions
        total = 0
        with self._read("count finished actions") as conn:
            for chunk in chunks(keys):
                total += conn.execute(
                    sa.select(sa.func.count()).where(
                        t.c.idempotency_key.in_(chunk), t.c.state.in_(sorted(FINAL_STATES))
                    )
                ).scalar_one()
        return int(total)

    def action_preview(self, *, playbook: str, partition_key: str, limit: int) -> pd.DataFrame:
        """Up to ``limit`` action rows of a partition, those needing a person first.

        One small query per state instead of sorting the whole partition, so the preview costs
        the same for 50 rows and for a million.
        """
        t = schema.actions
        columns = [
            t.c.entity_id,
            t.c.action,
            t.c.state,
            t.c.attempts,
            t.c.detail,
            t.c.error,
            t.c.updated_at,
        ]
        frames = []
        remaining = limit
        with self._read("preview actions") as conn:
            for state in PREVIEW_STATES:
                if remaining <= 0:
                    break
                query = (
                    sa.select(*columns)
                    .where(
                        t.c.playbook == playbook,
                        t.c.partition_key == partition_key,
                        t.c.state == state,
                    )
                    .limit(remaining)
                )
                frame = pd.read_sql(query, conn)
                if len(frame):
                    frames.append(frame)
                    remaining -= len(frame)
        if not frames:
            return pd.DataFrame(columns=[c.name for c in columns])
        return pd.concat(frames, ignore_index=True)

    def open_escalation_counts(
        self, *, playbook: str, partition_key: str
    ) -> list[tuple[str, str, int]]:
        """Open escalations of one partition, counted by kind and reason, largest first."""
        t = schema.escalations
        query = (
            sa.select(t.c.kind, t.c.reason, sa.func.count().label("n"))
            .where(t.c.playbook == playbook, t.c.partition_key == partition_key, t.c.status == OPEN)
            .group_by(t.c.kind, t.c.reason)
            .order_by(sa.desc("n"), t.c.kind, t.c.reason)
        )
        with self._read("count open escalations") as conn:
            return [(str(kind), str(reason), int(n)) for kind, reason, n in conn.execute(query)]

    def partition_versions(self, *, playbook: str, partition_key: str) -> dict[str, int]:
        """Ledger rows of one partition per playbook version that wrote them."""
        t = schema.actions
        query = (
            sa.select(t.c.playbook_version, sa.func.count())
            .where(t.c.playbook == playbook, t.c.partition_key == partition_key)
            .group_by(t.c.playbook_version)
        )
        with self._read("count playbook versions") as conn:
            return {str(v): int(n) for v, n in conn.execute(query)}

    def known_playbooks(self) -> list[str]:
        """Playbooks that have recorded at least one action or escalation."""
        a, e = schema.actions, schema.escalations
        with self._read("list playbooks") as conn:
            names = set(conn.execute(sa.select(a.c.playbook).distinct()).scalars())
            names |= set(conn.execute(sa.select(e.c.playbook).distinct()).scalars())
        return sorted(names)

    def partitions_with_pending_work(
        self, *, playbook: str, partition_keys: Sequence[str] | None = None
    ) -> list[str]:
        """Partitions holding actions not yet finished: reserved, sending or in doubt.

        These are what a pause interrupted, or a crash left behind; a new run of such a partition
        sends them (and nothing already sent).

        Args:
            playbook: The playbook.
            partition_keys: Only these partitions (None: every partition).

        Returns:
            The partition keys, sorted.
        """
        t = schema.actions
        base = (
            sa.select(t.c.partition_key)
            .where(t.c.playbook == playbook, t.c.state.in_(list(_PENDING_STATES)))
            .distinct()
        )
        found: set[str] = set()
        with self._read("list partitions with pending actions") as conn:
            if partition_keys is None:
                found.update(str(k) for k in conn.execute(base).scalars())
            else:
                for chunk in chunks(list(partition_keys)):
                    query = base.where(t.c.partition_key.in_(chunk))
                    found.update(str(k) for k in conn.execute(query).scalars())
        return sorted(found)

    def recorded_partitions(self, *, playbook: str, partition_keys: Sequence[str]) -> set[str]:
        """Which of ``partition_keys`` the playbook has executed: any action or escalation row.

        A batch a guardrail blocked holds only its escalation, and counts as executed.
        """
        a, e = schema.actions, schema.escalations
        found: set[str] = set()
        with self._read("list executed partitions") as conn:
            for chunk in chunks(list(partition_keys)):
                for table in (a, e):
                    query = (
                        sa.select(table.c.partition_key)
                        .where(table.c.playbook == playbook, table.c.partition_key.in_(chunk))
                        .distinct()
                    )
                    found.update(str(k) for k in conn.execute(query).scalars())
        return found

    def last_resumed_at(self, playbook: str) -> datetime | None:
        """When the kill switch was last lifted for ``playbook`` (its own or the global one)."""
        t = schema.controls
        query = sa.select(sa.func.max(t.c.updated_at)).where(
            t.c.scope.in_(["*", playbook]), t.c.paused.is_(False)
        )
        with self._read("read the kill switch") as conn:
            return conn.execute(query).scalar_one_or_none()

    def partition_outcome(self, *, playbook: str, partition_key: str) -> "PartitionOutcome":
        """What the ledger holds for one partition, over every run: the numbers people read.

        The Dagster metadata, the ``autoexec summary`` command and the demo all count with this
        one query, so they agree.
        """
        a, e = schema.actions, schema.escalations
        where = (a.c.playbook == playbook, a.c.partition_key == partition_key)
        kind = sa.case(
            (a.c.detail.like(f"{COOLDOWN_DETAIL}%"), "cooldown"),
            (a.c.detail.like(f"{STILL_OPEN_DETAIL}%"), "still_open"),
            (a.c.detail.like(f"{BUDGET_DETAIL}%"), "over_budget"),
            else_="",
        )
        rows_query = (
            sa.select(a.c.decision, a.c.action, a.c.state, kind.label("kind"), sa.func.count())
            .where(*where)
            .group_by(a.c.decision, a.c.action, a.c.state, kind)
        )
        still_open_query = (
            sa.select(a.c.detail, sa.func.count())
            .where(*where, a.c.detail.like(f"{STILL_OPEN_DETAIL}%"))
            .group_by(a.c.detail)
        )
        cases_query = (
            sa.select(e.c.kind, e.c.status, sa.func.count())
            .where(e.c.playbook == playbook, e.c.partition_key == partition_key)
            .group_by(e.c.kind, e.c.status)
        )
        w = schema.workflow_instances
        instances_query = (
            sa.select(w.c.state, sa.func.count())
            .where(w.c.playbook == playbook, w.c.partition_key == partition_key)
            .group_by(w.c.state)
        )
        outcome = PartitionOutcome(playbook=playbook, partition_key=partition_key)
        with self._read("count a partition's outcome") as conn:
            for decision, action, state, detail_kind, n in conn.execute(rows_query):
                outcome.add(str(decision), action, str(state), str(detail_kind), int(n))
            for detail, n in conn.execute(still_open_query):
                origin = str(detail)[len(STILL_OPEN_DETAIL) :].strip() or "?"
                outcome.still_open_by_partition[origin] = int(n)
            for case_kind, status, n in conn.execute(cases_query):
                if case_kind in ("guardrail", WORKFLOW_FAILED_KIND):
                    # Neither has an escalated action row: the batch, or the entity whose
                    # workflow failed, was escalated through the queue alone.
                    outcome.escalated += int(n)
                if case_kind == "guardrail":
                    outcome.blocked = True
                if status == OPEN:
                    outcome.open_escalations += int(n)
            for state, n in conn.execute(instances_query):
                if state == schema.SUCCEEDED:
                    outcome.workflows_succeeded += int(n)
                elif state in schema.ACTIVE_INSTANCE_STATES:
                    outcome.workflows_active += int(n)
        return outcome

    def workflow_outcome(self, *, playbook: str, partition_key: str) -> "WorkflowOutcome":
        """A partition's workflow instances, over every run: per state, per step, when next due.

        Four aggregate queries (instances per state and current step, step attempts per step
        and state, workflow escalations, the median time to resolution), whatever the number
        of instances.
        """
        w, a, e = schema.workflow_instances, schema.actions, schema.escalations
        where = (w.c.playbook == playbook, w.c.partition_key == partition_key)
        at_query = (
            sa.select(w.c.state, w.c.step, sa.func.count(), sa.func.min(w.c.next_due))
            .where(*where)
            .group_by(w.c.state, w.c.step)
        )
        attempts_query = (
            sa.select(a.c.step, a.c.state, sa.func.count())
            .where(
                a.c.playbook == playbook,
                a.c.partition_key == partition_key,
                a.c.instance_id.is_not(None),
            )
            .group_by(a.c.step, a.c.state)
        )
        escalated_query = sa.select(sa.func.count()).where(
            e.c.playbook == playbook,
            e.c.partition_key == partition_key,
            e.c.kind == WORKFLOW_FAILED_KIND,
        )
        outcome = WorkflowOutcome(playbook=playbook, partition_key=partition_key)
        with self._read("count a partition's workflows") as conn:
            for state, step, n, due in conn.execute(at_query):
                outcome.by_state[str(state)] = outcome.by_state.get(str(state), 0) + int(n)
                if step is not None and state in schema.ACTIVE_INSTANCE_STATES:
                    tally = outcome.at_step.setdefault(str(step), {})
                    tally[str(state)] = tally.get(str(state), 0) + int(n)
                if state == schema.WAITING and due is not None:
                    due = _aware(due)
                    if outcome.next_due is None or due < outcome.next_due:
                        outcome.next_due = due
            for step, state, n in conn.execute(attempts_query):
                tally = outcome.step_attempts.setdefault(str(step), {})
                tally[str(state)] = tally.get(str(state), 0) + int(n)
            outcome.escalated = int(conn.execute(escalated_query).scalar_one())
            outcome.median_resolution_seconds = self._median_resolution(conn, where)
        return outcome

    def _median_resolution(self, conn: sa.Connection, where: Sequence[Any]) -> float | None:
        """Median seconds from start to end of the finished (succeeded or failed) instances."""
        w = schema.workflow_instances
        if self.dialect == "postgresql":
            seconds: Any = sa.extract("epoch", w.c.finished_at - w.c.created_at)
        else:
            seconds = (sa.func.julianday(w.c.finished_at) - sa.func.julianday(w.c.created_at)) * (
                86_400.0
            )
        finished = (
            *where,
            w.c.state.in_([schema.SUCCEEDED, schema.FAILED]),
            w.c.finished_at.is_not(None),
        )
        n = int(conn.execute(sa.select(sa.func.count()).where(*finished)).scalar_one())
        if n == 0:
            return None
        # The middle one or two durations: a sort of one partition's finished instances, never a
        # transfer of all their rows.
        middle = (
            sa.select(seconds.label("s"))
            .where(*finished)
            .order_by(seconds)
            .offset((n - 1) // 2)
            .limit(2 - n % 2)
        )
        values = [float(v) for v in conn.execute(middle).scalars() if v is not None]
        return sum(values) / len(values) if values else None

    def find_instances(self, ids: Sequence[str], *, limit: int = 10) -> dict[str, pd.DataFrame]:
        """Workflow instances named by full ids or id prefixes: per id given, its matches.

        Args:
            ids: Instance ids, or their leading characters.
            limit: Most matches returned per prefix (enough to say a prefix is ambiguous).
        """
        w = schema.workflow_instances
        columns = [
            w.c.instance_id,
            w.c.playbook,
            w.c.partition_key,
            w.c.entity_id,
            w.c.workflow,
            w.c.state,
            w.c.step,
            w.c.finished_at,
            w.c.cancelled_by,
        ]
        found: dict[str, pd.DataFrame] = {}
        with self._read("find workflow instances") as conn:
            for given in ids:
                exact = pd.read_sql(sa.select(*columns).where(w.c.instance_id == given), conn)
                if len(exact):
                    found[given] = exact
                    continue
                pattern = given.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                found[given] = pd.read_sql(
                    sa.select(*columns)
                    .where(w.c.instance_id.like(f"{pattern}%", escape="\\"))
                    .order_by(w.c.instance_id)
                    .limit(limit),
                    conn,
                )
        return found

    def workflow_preview(self, *, playbook: str, partition_key: str, limit: int) -> pd.DataFrame:
        """Up to ``limit`` workflow instances of a partition: failed first, then those moving.

        One small query per state (as :meth:`action_preview`), so the preview costs the same for
        ten instances and for a hundred thousand.
        """
        w = schema.workflow_instances
        columns = [
            w.c.instance_id,
            w.c.entity_id,
            w.c.workflow,
            w.c.state,
            w.c.step,
            w.c.attempt,
            w.c.next_due,
            w.c.outputs,
            w.c.log,
            w.c.error,
            w.c.updated_at,
        ]
        frames = []
        remaining = limit
        with self._read("preview workflow instances") as conn:
            for state in WORKFLOW_PREVIEW_STATES:
                if remaining <= 0:
                    break
                query = (
                    sa.select(*columns)
                    .where(
                        w.c.playbook == playbook,
                        w.c.partition_key == partition_key,
                        w.c.state == state,
                    )
                    .order_by(w.c.updated_at.desc(), w.c.instance_id)
                    .limit(remaining)
                )
                frame = pd.read_sql(query, conn)
                if len(frame):
                    frames.append(frame)
                    remaining -= len(frame)
        if not frames:
            return pd.DataFrame(columns=[c.name for c in columns])
        return pd.concat(frames, ignore_index=True)


def _aware(value: Any) -> datetime:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        # SQLite returns the stored UTC time without its offset.
        stamp = stamp.tz_localize(UTC)
    return stamp.to_pydatetime()


_PENDING_STATES = (schema.RESERVED, schema.SENDING, schema.IN_DOUBT)
# How the executor's recording step marks the rows of skipped actions and re-found escalations
# (autoexec_dagster/executor/recording.py writes these details).
COOLDOWN_DETAIL = "cooldown:"
STILL_OPEN_DETAIL = "escalation still open since partition"


@dataclass
class PartitionOutcome:
    """A partition's totals in the ledger, over every run that executed it.

    Attributes:
        playbook: The playbook.
        partition_key: The partition.
        total: Entities recorded.
        flagged: Entities a rule acted on, escalated or held out.
        succeeded: Actions delivered.
        failed: Actions that failed for good.
        escalated: Entities escalated to a person for this partition (by a rule, a failed or
            in-doubt delivery, or the whole batch by a guardrail), not counting those whose
            escalation is still open from an earlier partition.
        still_open: Entities whose escalation by the same rule is still open from an earlier
            partition (not escalated again).
        still_open_by_partition: ``still_open`` by the partition the escalation was opened in.
        cooled_down: Actions not repeated because the same action went out recently.
        over_budget: Actions not sent because a budget of the playbook was spent.
        held_out: Entities in the control group.
        skipped: Entities no rule acted on.
        dry_run: Actions recorded as "would have been sent".
        pending: Actions reserved, sending or in doubt (not finished).
        open_escalations: Escalations of this partition still open.
        blocked: A guardrail escalated the whole batch.
        by_action: Per action, its outcomes (succeeded, failed, cooldown, held_out, ...).
        workflows: Entities handed to a workflow instance.
        workflows_succeeded: Of those, instances that finished every step (autonomous).
        workflows_active: Instances still running, waiting or failing (not decided yet).
        workflow_steps: Step attempts recorded (not entities: kept out of the totals).
        notifications: Approver notifications recorded (not entities either).
        approved_actions: Proposed actions people approved from the escalation queue (the
            entity is counted once, by its escalation).
        approved_actions_succeeded: Of those, delivered.
    """

    playbook: str
    partition_key: str
    total: int = 0
    flagged: int = 0
    succeeded: int = 0
    failed: int = 0
    escalated: int = 0
    still_open: int = 0
    still_open_by_partition: dict[str, int] = field(default_factory=dict)
    cooled_down: int = 0
    over_budget: int = 0
    held_out: int = 0
    skipped: int = 0
    dry_run: int = 0
    pending: int = 0
    open_escalations: int = 0
    blocked: bool = False
    by_action: dict[str, dict[str, int]] = field(default_factory=dict)
    workflows: int = 0
    workflows_succeeded: int = 0
    workflows_active: int = 0
    workflow_steps: int = 0
    notifications: int = 0
    approved_actions: int = 0
    approved_actions_succeeded: int = 0

    def add(self, decision: str, action: str | None, state: str, kind: str, n: int) -> None:
        """Count ``n`` ledger rows of one (decision, action, state, detail kind)."""
        if decision == "step":
            # A workflow's step attempt: the entity is counted once, by its workflow row.
            self.workflow_steps += n
            return
        if decision == "notify":
            self.notifications += n
            return
        if decision == "approved":
            # An escalation's proposed action a person approved: the entity is counted once,
            # by its escalation row.
            self.approved_actions += n
            if state == schema.SUCCEEDED:
                self.approved_actions_succeeded += n
            return
        self.total += n
        if decision == "workflow" and state == schema.WORKFLOW:
            self.flagged += n
            self.workflows += n
            return
        if decision != "skip":
            self.flagged += n
        outcome = state
        if state == schema.DRY_RUN and decision != "act":
            # A dry run records every decision as "dry_run"; count it by what it would have been.
            state = {
                "escalate": schema.ESCALATED,
                "holdout": schema.HELD_OUT,
                "workflow": schema.DRY_RUN,
            }.get(decision, schema.SKIPPED)
            outcome = state
        if state == schema.SUCCEEDED:
            self.succeeded += n
        elif state == schema.FAILED:
            self.failed += n
        elif state == schema.HELD_OUT:
            self.held_out += n
        elif state == schema.DRY_RUN:
            self.dry_run += n
        elif state in _PENDING_STATES:
            self.pending += n
            outcome = "pending"
        elif kind == "cooldown":
            self.cooled_down += n
            outcome = "cooldown"
        elif kind == "over_budget":
            self.over_budget += n
            outcome = "over_budget"
        elif kind == "still_open":
            self.still_open += n
        elif state == schema.ESCALATED:
            self.escalated += n
        elif state == schema.SKIPPED:
            self.skipped += n
        if action and decision in ("act", "holdout"):
            tally = self.by_action.setdefault(action, {})
            tally[outcome] = tally.get(outcome, 0) + n

    @property
    def autonomous(self) -> int:
        """Flagged entities handled without a person (as ExecutionReport counts them), and
        entities whose workflow finished every step."""
        return (
            self.succeeded
            + self.dry_run
            + self.cooled_down
            + self.over_budget
            + self.workflows_succeeded
        )

    @property
    def autonomy_rate(self) -> float | None:
        """Share of flagged entities handled without a person (holdouts and still-open ones
        excluded, as in ExecutionReport, and workflows still under way); None before anything
        was decided."""
        denominator = self.autonomous + self.escalated + self.failed
        return None if denominator == 0 else self.autonomous / denominator

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {
            "playbook": self.playbook,
            "partition_key": self.partition_key,
            "total": self.total,
            "flagged": self.flagged,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "escalated": self.escalated,
            "still_open": self.still_open,
            "still_open_by_partition": dict(self.still_open_by_partition),
            "cooled_down": self.cooled_down,
            "over_budget": self.over_budget,
            "held_out": self.held_out,
            "skipped": self.skipped,
            "dry_run": self.dry_run,
            "pending": self.pending,
            "open_escalations": self.open_escalations,
            "blocked": self.blocked,
            "autonomy_rate": self.autonomy_rate,
            "by_action": {k: dict(v) for k, v in self.by_action.items()},
            "workflows": self.workflows,
            "workflows_succeeded": self.workflows_succeeded,
            "workflows_active": self.workflows_active,
            "workflow_steps": self.workflow_steps,
            "notifications": self.notifications,
            "approved_actions": self.approved_actions,
            "approved_actions_succeeded": self.approved_actions_succeeded,
        }


@dataclass
class WorkflowOutcome:
    """A partition's workflow instances in the ledger, over every run.

    Attributes:
        playbook: The playbook.
        partition_key: The partition.
        by_state: Instances per state (running, waiting, failing, succeeded, failed, cancelled).
        at_step: Per current step, active instances there by state.
        step_attempts: Per step, recorded attempts by state (succeeded, failed, reserved, ...).
        next_due: When the earliest waiting instance is due next (None when none waits).
        escalated: Entities escalated because their workflow failed.
        median_resolution_seconds: Median time from start to end of the succeeded and failed
            instances (None before any finished).
    """

    playbook: str
    partition_key: str
    by_state: dict[str, int] = field(default_factory=dict)
    at_step: dict[str, dict[str, int]] = field(default_factory=dict)
    step_attempts: dict[str, dict[str, int]] = field(default_factory=dict)
    next_due: datetime | None = None
    escalated: int = 0
    median_resolution_seconds: float | None = None

    @property
    def started(self) -> int:
        """Instances started in the partition (every state)."""
        return sum(self.by_state.values())

    @property
    def running(self) -> int:
        """Instances due or moving now, including those running their failure steps."""
        return self.by_state.get(schema.RUNNING, 0) + self.by_state.get(schema.FAILING, 0)

    @property
    def waiting(self) -> int:
        """Instances waiting in the ledger (a poll interval or a timer)."""
        return self.by_state.get(schema.WAITING, 0)

    @property
    def succeeded(self) -> int:
        """Instances that finished every step."""
        return self.by_state.get(schema.SUCCEEDED, 0)

    @property
    def failed(self) -> int:
        """Instances that failed for good."""
        return self.by_state.get(schema.FAILED, 0)

    @property
    def cancelled(self) -> int:
        """Instances a person cancelled."""
        return self.by_state.get(schema.CANCELLED, 0)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {
            "playbook": self.playbook,
            "partition_key": self.partition_key,
            "started": self.started,
            "running": self.running,
            "waiting": self.waiting,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "escalated": self.escalated,
            "next_due": self.next_due.isoformat() if self.next_due else None,
            "median_resolution_seconds": self.median_resolution_seconds,
            "by_state": dict(self.by_state),
            "at_step": {k: dict(v) for k, v in self.at_step.items()},
            "step_attempts": {k: dict(v) for k, v in self.step_attempts.items()},
        }
