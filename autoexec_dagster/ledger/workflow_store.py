"""Workflow instances in the ledger: started once, claimed when due, saved after each advance.

Nothing waits in a process: an instance records the step it is at and when it is next due, and a
later run claims the due ones (under a lease, like actions, so two runs never advance the same
instance), takes each as far as it can go, and saves where it stopped.
"""

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa

from autoexec_dagster.errors import LedgerError
from autoexec_dagster.ledger import payload, schema
from autoexec_dagster.ledger.engine import LedgerBase, chunks
from autoexec_dagster.ledger.engine import now as utcnow
from autoexec_dagster.ledger.schema import ACTIVE_INSTANCE_STATES, CANCELLED


def _active(column: Any) -> Any:
    """``state IN ('running', 'waiting', 'failing')`` written as literals.

    SQLite uses a partial index only when it can prove the query implies the index's WHERE
    clause; with bound parameters it cannot, and walks every instance of the playbook (268 ms
    instead of 16 ms over a million instances).
    """
    return column.in_(
        sa.bindparam(
            "active_states", list(ACTIVE_INSTANCE_STATES), expanding=True, literal_execute=True
        )
    )


# Columns a claimed instance carries into an advance.
INSTANCE_COLUMNS: tuple[str, ...] = (
    "instance_id",
    "playbook",
    "playbook_version",
    "workflow",
    "insight",
    "partition_key",
    "entity_id",
    "rule",
    "state",
    "step",
    "step_index",
    "attempt",
    "step_started_at",
    "next_due",
    "outputs",
    "log",
    "data",
    "created_at",
)
# Columns an advance may change.
SAVED_COLUMNS: tuple[str, ...] = (
    "state",
    "step",
    "step_index",
    "attempt",
    "step_started_at",
    "next_due",
    "outputs",
    "log",
    "error",
    "finished_at",
)


def _aware(value: Any) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite hands back naive ones, and aggregates as
    text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class WorkflowStore(LedgerBase):
    """Start, claim, save, cancel and list workflow instances."""

    def start_instances(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert instances that do not exist yet; returns the ids inserted by this call.

        Each row holds instance_id, playbook, playbook_version, workflow, insight, partition_key,
        entity_id, rule, step, data (JSON text) and run_id. New instances are due at once.
        """
        if not rows:
            return []
        stamp = utcnow()
        due = self.clock()
        t = schema.workflow_instances
        statement = self._insert_ignore(t).returning(t.c.instance_id)
        inserted: list[str] = []
        with self._write("start workflow instances") as conn:
            for chunk in chunks(rows, 5_000):
                values = [
                    {
                        "state": schema.RUNNING,
                        "step_index": 0,
                        "attempt": 0,
                        "next_due": due,
                        "outputs": "{}",
                        "log": "[]",
                        # The clock's time, as finished_at is: time to resolution spans both.
                        "created_at": due,
                        "updated_at": stamp,
                        **row,
                    }
                    for row in chunk
                ]
                inserted.extend(r[0] for r in conn.execute(statement, values))
        return inserted

    def recent_workflow_starts(
        self,
        *,
        playbook: str,
        entity_ids: Sequence[str],
        since: datetime,
        exclude_partition: str,
    ) -> dict[tuple[str, str], datetime]:
        """When each entity last started each workflow since ``since``, in other partitions.

        Keyed ``(entity_id, "workflow:<name>")``, as the cooldown guardrail looks them up.
        """
        t = schema.workflow_instances
        found: dict[tuple[str, str], datetime] = {}
        with self._read("read recent workflow starts") as conn:
            for chunk in chunks(list(dict.fromkeys(entity_ids))):
                rows = conn.execute(
                    sa.select(t.c.entity_id, t.c.workflow, sa.func.max(t.c.created_at))
                    .where(
                        t.c.playbook == playbook,
                        t.c.entity_id.in_(chunk),
                        t.c.created_at >= since,
                        t.c.partition_key != exclude_partition,
                    )
                    .group_by(t.c.entity_id, t.c.workflow)
                )
                for entity, workflow, last in rows:
                    found[(str(entity), f"workflow:{workflow}")] = _aware(last) or since
        return found

    def instances_exist(self, instance_ids: Sequence[str]) -> dict[str, bool]:
        """Whether each instance id has an instance (a decision recorded before a crash may not)."""
        t = schema.workflow_instances
        found: set[str] = set()
        with self._read("look up workflow instances") as conn:
            for chunk in chunks(list(instance_ids)):
                found.update(
                    conn.execute(
                        sa.select(t.c.instance_id).where(t.c.instance_id.in_(chunk))
                    ).scalars()
                )
        return {i: i in found for i in instance_ids}

    def claim_instances(
        self,
        *,
        playbook: str,
        worker: str,
        lease_seconds: float,
        partition_key: str | None = None,
        instance_ids: Sequence[str] | None = None,
        limit: int = 5_000,
    ) -> list[dict[str, Any]]:
        """Claim active instances that are due now (by the ledger's clock), oldest due first.

        Instances held by another worker whose lease has not run out are skipped.

        Returns:
            The claimed instances as dicts of :data:`INSTANCE_COLUMNS`.
        """
        t = schema.workflow_instances
        moment = time.time()
        free = sa.or_(t.c.worker.is_(None), t.c.lease_expires_at < moment)
        where = [
            t.c.playbook == playbook,
            _active(t.c.state),
            t.c.next_due <= self.clock(),
            free,
        ]
        if partition_key is not None:
            where.append(t.c.partition_key == partition_key)
        if instance_ids is not None:
            where.append(t.c.instance_id.in_(list(instance_ids)))
        pick = sa.select(t.c.instance_id).where(*where).order_by(t.c.next_due).limit(limit)
        if self.dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        columns = [t.c[name] for name in INSTANCE_COLUMNS]
        with self._write("claim workflow instances") as conn:
            result = conn.execute(
                sa.update(t)
                .where(t.c.instance_id.in_(pick.scalar_subquery()))
                .values(worker=worker, lease_expires_at=moment + lease_seconds)
                .returning(*columns)
            )
            return [dict(zip(INSTANCE_COLUMNS, row, strict=True)) for row in result]

    def save_instances(
        self,
        updates: Sequence[Mapping[str, Any]],
        *,
        worker: str,
        applied_approvals: Sequence[str] = (),
    ) -> int:
        """Write what an advance changed and release the claims; returns the rows written.

        Each update holds instance_id and the :data:`SAVED_COLUMNS`. Only instances still held by
        ``worker`` are written, so an advance whose lease ran out cannot overwrite a newer one.
        ``applied_approvals`` are the decided approval requests this advance acted on, marked
        applied in the same transaction, so a crash neither loses nor repeats a decision.
        """
        if not updates:
            return 0
        t = schema.workflow_instances
        statement = (
            sa.update(t)
            .where(t.c.instance_id == sa.bindparam("b_id"), t.c.worker == worker)
            .values(
                **{name: sa.bindparam(f"b_{name}") for name in SAVED_COLUMNS},
                worker=None,
                lease_expires_at=None,
                updated_at=utcnow(),
            )
        )
        params = [
            {"b_id": u["instance_id"], **{f"b_{n}": u.get(n) for n in SAVED_COLUMNS}}
            for u in updates
        ]
        written = 0
        a = schema.approvals
        with self._write("save workflow instances") as conn:
            for chunk in chunks(params, 5_000):
                result = conn.execute(statement, chunk)
                written += max(result.rowcount or 0, 0)
            for chunk in chunks(list(applied_approvals)):
                conn.execute(
                    sa.update(a)
                    .where(a.c.approval_id.in_(chunk), a.c.applied_at.is_(None))
                    .values(applied_at=self.clock())
                )
            # A decision that landed while this advance held an instance set it due, and the
            # UPDATE above just wrote the advance's own next_due over that: make it due again in
            # the same transaction, so no crash can leave a decided instance waiting.
            waiting = [u["instance_id"] for u in updates if u.get("state") == schema.WAITING]
            for chunk in chunks(waiting):
                decided = sa.select(a.c.instance_id).where(
                    a.c.instance_id.in_(chunk),
                    a.c.applied_at.is_(None),
                    a.c.status.in_([schema.APPROVED, schema.REJECTED]),
                )
                conn.execute(
                    sa.update(t).where(t.c.instance_id.in_(decided)).values(next_due=self.clock())
                )
        return written

    def amend_instance(
        self,
        instance_id: str,
        *,
        step: str,
        changes: Mapping[str, Any],
        by: str,
        note: str,
    ) -> dict[str, Any]:
        """Correct fields of one step's output of an active instance (a person edits the
        purchase order); returns the step's new output.

        The change is logged on the instance with who and why, and the instance is due at once.
        Its approval requests not yet applied are void in the same transaction (nobody approved
        the amended payload), so a decision on them is refused; the next advance asks again.

        Raises:
            LedgerError: The instance does not exist, is not active, is being advanced right
                now, or has no output for ``step``; nothing is written.
        """
        if not (by or "").strip() or not (note or "").strip():
            raise LedgerError("an amendment needs who (by) and why (note)")
        t = schema.workflow_instances
        moment = self.clock()
        with self._write("amend a workflow instance") as conn:
            row = conn.execute(
                sa.select(t.c.state, t.c.outputs, t.c.log, t.c.worker, t.c.lease_expires_at).where(
                    t.c.instance_id == instance_id
                )
            ).first()
            if row is None:
                raise LedgerError(f"no workflow instance {instance_id!r}")
            if row.state not in ACTIVE_INSTANCE_STATES:
                raise LedgerError(
                    f"instance {instance_id} is {row.state}; only an active one can change"
                )
            if row.worker is not None and (row.lease_expires_at or 0) > time.time():
                raise LedgerError(f"instance {instance_id} is being advanced right now; try again")
            outputs = payload.loads(row.outputs)
            if not isinstance(outputs.get(step), dict):
                raise LedgerError(
                    f"instance {instance_id} has no output of step {step!r} (it has "
                    f"{sorted(outputs)})"
                )
            outputs[step] = {**outputs[step], **changes}
            log = list(payload.loads_value(row.log, []))
            log.append(
                {
                    "step": step,
                    "outcome": "amended",
                    "attempt": 0,
                    "at": moment.isoformat(),
                    "detail": f"amended by {by}: {note} ({sorted(changes)})"[:500],
                }
            )
            conn.execute(
                sa.update(t)
                .where(t.c.instance_id == instance_id)
                .values(
                    outputs=payload.dumps(outputs),
                    log=payload.dumps_value(log),
                    next_due=moment,
                    updated_at=utcnow(),
                )
            )
            # Nobody approved the amended payload: its open requests are void at once, in this
            # transaction, so a link or a command line decision on them is refused from now on
            # (the next advance asks again for the new payload).
            a = schema.approvals
            conn.execute(
                sa.update(a)
                .where(
                    a.c.instance_id == instance_id,
                    a.c.applied_at.is_(None),
                    a.c.status.in_([schema.PENDING, schema.APPROVED, schema.REJECTED]),
                )
                .values(
                    status=schema.VOID,
                    decided_at=moment,
                    decided_by="autoexec",
                    decided_via="autoexec",
                    decision_note=f"the payload changed: amended by {by}: {note}"[:500],
                    applied_at=moment,
                )
            )
        return outputs[step]

    def wake_instances(self, instance_ids: Sequence[str]) -> int:
        """Make active instances due now (a decision arrived); returns how many."""
        t = schema.workflow_instances
        woken = 0
        with self._write("wake workflow instances") as conn:
            for chunk in chunks(list(instance_ids)):
                result = conn.execute(
                    sa.update(t)
                    .where(t.c.instance_id.in_(chunk), t.c.state.in_(ACTIVE_INSTANCE_STATES))
                    .values(next_due=self.clock())
                )
                woken += result.rowcount or 0
        return woken

    def heartbeat_instances(self, *, worker: str, lease_seconds: float) -> int:
        """Extend the lease of every instance this worker holds; returns how many."""
        t = schema.workflow_instances
        with self._write("extend workflow leases") as conn:
            result = conn.execute(
                sa.update(t)
                .where(t.c.worker == worker)
                .values(lease_expires_at=time.time() + lease_seconds)
            )
            return result.rowcount or 0

    def release_instances(self, instance_ids: Sequence[str], *, worker: str) -> None:
        """Give claimed instances back unchanged (e.g. their step is held by another worker)."""
        t = schema.workflow_instances
        with self._write("release workflow instances") as conn:
            for chunk in chunks(instance_ids):
                conn.execute(
                    sa.update(t)
                    .where(t.c.instance_id.in_(chunk), t.c.worker == worker)
                    .values(worker=None, lease_expires_at=None)
                )

    def due_partitions(
        self, *, playbook: str, now: datetime | None = None
    ) -> list[tuple[str, int, datetime]]:
        """Partitions with due workflow work: ``(partition, instances due, earliest due)``.

        One query on the partial index of active instances by (playbook, next_due); finished
        instances are never scanned.
        """
        t = schema.workflow_instances
        moment = self.clock() if now is None else now
        query = (
            sa.select(t.c.partition_key, sa.func.count(), sa.func.min(t.c.next_due))
            .where(
                t.c.playbook == playbook,
                _active(t.c.state),
                t.c.next_due <= moment,
            )
            .group_by(t.c.partition_key)
            .order_by(t.c.partition_key)
        )
        with self._read("find due workflow work") as conn:
            return [(str(p), int(n), _aware(due) or moment) for p, n, due in conn.execute(query)]

    def next_due(self, *, playbook: str, partition_key: str | None = None) -> datetime | None:
        """When the earliest active instance is next due (None when none is active)."""
        t = schema.workflow_instances
        where = [t.c.playbook == playbook, _active(t.c.state)]
        if partition_key is not None:
            where.append(t.c.partition_key == partition_key)
        with self._read("find the next due workflow work") as conn:
            due = conn.execute(sa.select(sa.func.min(t.c.next_due)).where(*where)).scalar()
        return _aware(due)

    def cancel_instances(self, instance_ids: Iterable[str], *, by: str, reason: str) -> list[str]:
        """Cancel active instances (who and why are recorded); returns the ids cancelled.

        An instance another run is advancing right now is cancelled too: that run's save is then
        refused (it no longer holds the claim), so nothing it would do after the cancel lands.
        """
        t = schema.workflow_instances
        stamp = utcnow()
        done: list[str] = []
        with self._write("cancel workflow instances") as conn:
            for chunk in chunks(list(instance_ids)):
                result = conn.execute(
                    sa.update(t)
                    .where(t.c.instance_id.in_(chunk), t.c.state.in_(ACTIVE_INSTANCE_STATES))
                    .values(
                        state=CANCELLED,
                        next_due=None,
                        worker=None,
                        lease_expires_at=None,
                        cancelled_by=by,
                        cancel_reason=reason,
                        updated_at=stamp,
                        finished_at=stamp,
                    )
                    .returning(t.c.instance_id)
                )
                done.extend(r[0] for r in result)
        return done

    def instances(
        self,
        *,
        playbook: str | None = None,
        partition_key: str | None = None,
        states: Iterable[str] | None = None,
        entity_id: str | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Workflow instances, most recently updated first."""
        t = schema.workflow_instances
        query = sa.select(t).order_by(t.c.updated_at.desc(), t.c.instance_id)
        if playbook is not None:
            query = query.where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        if states is not None:
            query = query.where(t.c.state.in_(list(states)))
        if entity_id is not None:
            query = query.where(t.c.entity_id == entity_id)
        if limit is not None:
            query = query.limit(limit)
        with self._read("list workflow instances") as conn:
            return pd.read_sql(query, conn)

    def instance_counts(self, *, playbook: str, partition_key: str | None = None) -> dict[str, int]:
        """Instances per state."""
        t = schema.workflow_instances
        query = (
            sa.select(t.c.state, sa.func.count())
            .where(t.c.playbook == playbook)
            .group_by(t.c.state)
        )
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        with self._read("count workflow instances") as conn:
            return {str(s): int(n) for s, n in conn.execute(query)}

    def entity_history(
        self, entity_id: str, *, playbook: str | None = None
    ) -> dict[str, pd.DataFrame]:
        """Everything the ledger holds about one entity, across partitions, oldest first.

        Returns:
            ``actions`` (every action and step attempt, with its outcome and output),
            ``workflows`` (its instances with their log and outputs) and ``escalations``.
        """
        a, w, e = schema.actions, schema.workflow_instances, schema.escalations
        action_columns = [c for c in a.c if c.name != "payload"]
        queries = {
            "actions": sa.select(*action_columns)
            .where(a.c.entity_id == entity_id)
            .order_by(a.c.created_at, a.c.idempotency_key),
            "workflows": sa.select(w)
            .where(w.c.entity_id == entity_id)
            .order_by(w.c.created_at, w.c.instance_id),
            "escalations": sa.select(e)
            .where(e.c.entity_id == entity_id)
            .order_by(e.c.created_at, e.c.idempotency_key),
        }
        tables = {"actions": a, "workflows": w, "escalations": e}
        found: dict[str, pd.DataFrame] = {}
        with self._read("read an entity's history") as conn:
            for name, query in queries.items():
                if playbook is not None:
                    query = query.where(tables[name].c.playbook == playbook)
                found[name] = pd.read_sql(query, conn)
        return found

    def step_outcomes(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None, str | None]]:
        """``(state, output JSON, error)`` of each existing step-attempt key."""
        t = schema.actions
        found: dict[str, tuple[str, str | None, str | None]] = {}
        with self._read("read step outcomes") as conn:
            for chunk in chunks(keys):
                for key, state, output, error in conn.execute(
                    sa.select(t.c.idempotency_key, t.c.state, t.c.output, t.c.error).where(
                        t.c.idempotency_key.in_(chunk)
                    )
                ):
                    found[key] = (state, output, error)
        return found
