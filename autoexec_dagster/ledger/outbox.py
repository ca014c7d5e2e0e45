"""The outbox: every side effect is reserved before it happens and completed after it.

1. ``reserve``: one row per action, ``INSERT .. ON CONFLICT DO NOTHING`` keyed by the idempotency
   key, before any side effect; a pending action keeps its request data in the row.
2. ``claim``: move reserved rows to ``sending`` under a lease, atomically (``BEGIN IMMEDIATE`` on
   SQLite, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), and hand back the work items, request data
   included, so a worker sends from the ledger alone. Two workers never claim the same row.
3. ``complete``: record outcomes in batches; only the worker holding the claim may complete it.
4. ``recover``: rows left in ``sending`` by a dead worker (its lease ran out, or its process is
   provably gone) become ``in_doubt``: at-least-once actions are claimed again with the same key,
   at-most-once actions are escalated for a person to reconcile.
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from autoexec_dagster.ledger import payload, schema
from autoexec_dagster.ledger.engine import LedgerBase, chunks
from autoexec_dagster.ledger.engine import now as utcnow
from autoexec_dagster.ledger.escalations import escalation_row
from autoexec_dagster.ledger.liveness import worker_is_dead
from autoexec_dagster.ledger.schema import IN_DOUBT, RESERVED, SENDING, SKIPPED


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One claimed action, as the ledger holds it: everything needed to send it.

    Attributes:
        key: Idempotency key.
        action: Action name (the channel that executes it).
        entity_id: The entity.
        playbook: Playbook name.
        playbook_version: Playbook version that reserved it.
        insight: Insight asset key.
        partition_key: Insight partition.
        rule: The rule that chose the action.
        delivery: ``at_least_once`` or ``at_most_once``.
        data: The request's entity data, as reserved.
        variant: The experiment variant it is sent with, if any.
    """

    key: str
    action: str
    entity_id: str
    playbook: str
    playbook_version: str
    insight: str
    partition_key: str
    rule: str
    delivery: str
    data: Mapping[str, Any] = field(default_factory=dict)
    variant: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one claimed action ended, as written by :meth:`Outbox.complete`.

    Attributes:
        key: Idempotency key.
        state: A final state (succeeded, failed, escalated).
        attempts: Attempts made by this worker.
        detail: Short receipt or status (``"HTTP 200"``).
        error: Error text of the last failure, without secrets.
        request_digest: Digest of the request as sent.
        output: The reply's bounded JSON output (text), for later steps.
        escalation_kind: When set, an escalation is opened with this kind and ``error`` as reason.
    """

    key: str
    state: str
    attempts: int
    detail: str | None = None
    error: str | None = None
    request_digest: str | None = None
    output: str | None = None
    escalation_kind: str | None = None


class Outbox(LedgerBase):
    """Reserve, claim, heartbeat, complete and recover actions."""

    def reserve(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert action rows that do not exist yet; existing keys are left untouched.

        Each row holds the columns of ``autoexec_actions`` (at least idempotency_key, playbook,
        playbook_version, insight, partition_key, entity_id, rule, action, decision, state); a
        ``data`` mapping, if given, is stored as the request's payload.

        Returns:
            The keys inserted by this call (``INSERT .. ON CONFLICT DO NOTHING RETURNING``), so
            a concurrent worker's rows are never mistaken for ours.
        """
        if not rows:
            return []
        with self._write("reserve actions") as conn:
            return self._insert_actions(conn, rows)

    def _insert_actions(self, conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert the rows that do not exist yet, in ``conn``'s transaction; the keys inserted."""
        stamp = utcnow()
        t = schema.actions
        statement = self._insert_ignore(t).returning(t.c.idempotency_key)
        inserted: list[str] = []
        for chunk in chunks(rows, 5_000):
            values = []
            for row in chunk:
                data = row.get("data")
                record = {k: v for k, v in row.items() if k != "data"}
                # executemany needs the same columns in every row.
                record["payload"] = payload.dumps(data) if data is not None else None
                values.append({"created_at": stamp, "updated_at": stamp, **record})
            inserted.extend(r[0] for r in conn.execute(statement, values))
        return inserted

    def states(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """Current ``(state, worker)`` of each existing key."""
        found: dict[str, tuple[str, str | None]] = {}
        t = schema.actions
        with self._read("read action states") as conn:
            for chunk in chunks(keys):
                for key, state, worker in conn.execute(
                    sa.select(t.c.idempotency_key, t.c.state, t.c.worker).where(
                        t.c.idempotency_key.in_(chunk)
                    )
                ):
                    found[key] = (state, worker)
        return found

    def stale_claims(self, keys: Sequence[str], *, now: float | None = None) -> list[str]:
        """The keys of ``keys`` left in ``sending`` by a dead worker, read without locking.

        The same test as :meth:`recover` (lease run out, or on this machine the process gone),
        so a sweep can narrow what it recovers to rows no live worker holds, and never waits on
        one.
        """
        t = schema.actions
        moment = time.time() if now is None else now
        stale: list[str] = []
        with self._read("find stale claims") as conn:
            for chunk in chunks(keys):
                for key, worker, lease in conn.execute(
                    sa.select(t.c.idempotency_key, t.c.worker, t.c.lease_expires_at).where(
                        t.c.idempotency_key.in_(chunk), t.c.state == SENDING
                    )
                ):
                    if (lease is not None and lease < moment) or worker_is_dead(worker):
                        stale.append(key)
        return stale

    def recover(self, keys: Sequence[str], *, now: float | None = None) -> dict[str, str]:
        """Mark actions left in ``sending`` by a dead worker as ``in_doubt``.

        A worker is dead when its lease expired, or when it provably ran on this machine and its
        process is gone. Live workers' claims are left alone.

        Returns:
            Recovered keys mapped to their delivery mode (at_least_once or at_most_once).
        """
        t = schema.actions
        moment = time.time() if now is None else now
        recovered: dict[str, str] = {}
        with self._write("recover in-doubt actions") as conn:
            for chunk in chunks(keys):
                rows = conn.execute(
                    sa.select(t.c.idempotency_key, t.c.worker, t.c.lease_expires_at, t.c.delivery)
                    .where(t.c.idempotency_key.in_(chunk), t.c.state == SENDING)
                    .with_for_update()
                ).all()
                stale = [
                    (key, delivery)
                    for key, worker, lease, delivery in rows
                    if (lease is not None and lease < moment) or worker_is_dead(worker)
                ]
                if stale:
                    conn.execute(
                        sa.update(t)
                        .where(t.c.idempotency_key.in_([k for k, _ in stale]), t.c.state == SENDING)
                        .values(
                            state=IN_DOUBT, worker=None, lease_expires_at=None, updated_at=utcnow()
                        )
                    )
                    recovered.update(stale)
        return recovered

    def skip_unsent(self, keys: Sequence[str], *, detail: str) -> list[str]:
        """Mark actions that were never sent and must not be any more as ``skipped``.

        Only rows still reserved or in doubt change (recover a dead worker's ``sending`` rows
        first); a row another worker is sending, or that has finished, is left alone. Returns
        the keys skipped.
        """
        t = schema.actions
        skipped: list[str] = []
        with self._write("skip unsent actions") as conn:
            for chunk in chunks(list(keys)):
                result = conn.execute(
                    sa.update(t)
                    .where(t.c.idempotency_key.in_(chunk), t.c.state.in_([RESERVED, IN_DOUBT]))
                    .values(
                        state=SKIPPED,
                        detail=detail[:500],
                        payload=None,
                        worker=None,
                        lease_expires_at=None,
                        updated_at=utcnow(),
                        completed_at=utcnow(),
                    )
                    .returning(t.c.idempotency_key)
                )
                skipped.extend(r[0] for r in result)
        return skipped

    def claim(
        self, keys: Sequence[str], *, worker: str, lease_seconds: float, run_id: str | None
    ) -> list[WorkItem]:
        """Atomically move claimable actions to ``sending`` for this worker.

        Claimable: ``reserved``, or ``in_doubt`` with at-least-once delivery. Rows claimed by
        another worker are skipped, never waited for.

        Returns:
            The work items this worker now holds, request data included; only these may be sent.
        """
        t = schema.actions
        claimable = sa.or_(
            t.c.state == RESERVED,
            sa.and_(t.c.state == IN_DOUBT, t.c.delivery == "at_least_once"),
        )
        # The same test on an expression no index serves: the keys alone find the rows. Given
        # ``state`` itself, a planner whose statistics predate the partition (autovacuum
        # analyses after a tenth of the table changed) believes few rows are reserved, serves
        # the lock from the state index and filters every reserved row of the ledger against
        # the batch, so each claim would cost more as the partition grows.
        state = t.c.state.concat("")
        by_key_only = sa.or_(
            state == RESERVED, sa.and_(state == IN_DOUBT, t.c.delivery == "at_least_once")
        )
        values = {
            "state": SENDING,
            "worker": worker,
            "lease_expires_at": time.time() + lease_seconds,
            "run_id": run_id,
            "updated_at": utcnow(),
        }
        returned = (
            t.c.idempotency_key,
            t.c.action,
            t.c.entity_id,
            t.c.playbook,
            t.c.playbook_version,
            t.c.insight,
            t.c.partition_key,
            t.c.rule,
            t.c.delivery,
            t.c.payload,
            t.c.variant,
        )
        claimed: list[WorkItem] = []
        with self._write("claim actions") as conn:
            for chunk in chunks(keys):
                if self.dialect == "postgresql":
                    locked = (
                        sa.select(t.c.idempotency_key)
                        .where(t.c.idempotency_key.in_(chunk), by_key_only)
                        .with_for_update(skip_locked=True)
                    )
                    where = t.c.idempotency_key.in_(locked)
                else:
                    # BEGIN IMMEDIATE already holds SQLite's single write lock.
                    where = sa.and_(t.c.idempotency_key.in_(chunk), claimable)
                result = conn.execute(
                    sa.update(t).where(where).values(**values).returning(*returned)
                )
                for (
                    key,
                    action,
                    entity,
                    pb,
                    version,
                    insight,
                    partition,
                    rule,
                    mode,
                    data,
                    variant,
                ) in result:
                    claimed.append(
                        WorkItem(
                            key=key,
                            action=action or "",
                            entity_id=entity,
                            playbook=pb,
                            playbook_version=version,
                            insight=insight,
                            partition_key=partition,
                            rule=rule,
                            delivery=mode,
                            data=payload.loads(data),
                            variant=variant,
                        )
                    )
        return claimed

    def heartbeat(self, *, worker: str, lease_seconds: float) -> int:
        """Extend the lease of every action this worker holds; returns how many."""
        t = schema.actions
        with self._write("extend leases") as conn:
            result = conn.execute(
                sa.update(t)
                .where(t.c.worker == worker, t.c.state == SENDING)
                .values(lease_expires_at=time.time() + lease_seconds)
            )
            return result.rowcount or 0

    def release(self, keys: Sequence[str], *, worker: str) -> None:
        """Give claimed but unsent actions back (state ``reserved``), e.g. on pause."""
        t = schema.actions
        with self._write("release claims") as conn:
            for chunk in chunks(keys):
                conn.execute(
                    sa.update(t)
                    .where(
                        t.c.idempotency_key.in_(chunk), t.c.worker == worker, t.c.state == SENDING
                    )
                    .values(state=RESERVED, worker=None, lease_expires_at=None, updated_at=utcnow())
                )

    def complete(
        self,
        outcomes: Sequence[Outcome],
        *,
        worker: str,
        escalation_context: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Record outcomes of claimed actions in one transaction.

        Only rows still held by ``worker`` in ``sending`` are updated, and only those open an
        escalation, so a worker whose claim was recovered by another cannot overwrite the newer
        outcome. The request payload is cleared: a finished action keeps no entity data.

        Args:
            outcomes: Final outcomes.
            worker: The worker that holds the claims.
            escalation_context: Per key, the fields of the escalation to open for outcomes with
                an ``escalation_kind`` (entity data, rule, playbook, partition).

        Returns:
            The number of rows updated.
        """
        if not outcomes:
            return 0
        t = schema.actions
        stamp = utcnow()
        statement = (
            sa.update(t)
            .where(
                t.c.idempotency_key == sa.bindparam("b_key"),
                t.c.worker == sa.bindparam("b_worker"),
                t.c.state == SENDING,
            )
            .values(
                state=sa.bindparam("b_state"),
                attempts=t.c.attempts + sa.bindparam("b_attempts"),
                detail=sa.bindparam("b_detail"),
                error=sa.bindparam("b_error"),
                request_digest=sa.bindparam("b_digest"),
                output=sa.bindparam("b_output"),
                payload=None,
                lease_expires_at=None,
                updated_at=stamp,
                completed_at=stamp,
            )
        )
        params = [
            {
                "b_key": o.key,
                "b_worker": worker,
                "b_state": o.state,
                "b_attempts": o.attempts,
                "b_detail": (o.detail or "")[:500] or None,
                "b_error": o.error,
                "b_digest": o.request_digest,
                "b_output": o.output,
            }
            for o in outcomes
        ]
        escalating = [o for o in outcomes if o.escalation_kind]
        with self._write("record action outcomes") as conn:
            held: set[str] = set()
            # Only an escalation needs to know which rows this worker still holds (it opens
            # one only for those); the common batch is one guarded executemany.
            for chunk in chunks([o.key for o in escalating]):
                held.update(
                    conn.execute(
                        sa.select(t.c.idempotency_key)
                        .where(
                            t.c.idempotency_key.in_(chunk),
                            t.c.worker == worker,
                            t.c.state == SENDING,
                        )
                        .with_for_update()
                    ).scalars()
                )
            result = conn.execute(statement, params)
            opened = [o for o in escalating if o.key in held]
            if opened:
                context = escalation_context or {}
                conn.execute(
                    self._insert_ignore(schema.escalations),
                    [
                        escalation_row(
                            key=o.key,
                            kind=o.escalation_kind or "delivery_failed",
                            reason=o.error or "delivery failed",
                            context=context.get(o.key, {}),
                            now=stamp,
                        )
                        for o in opened
                    ],
                )
        written = result.rowcount
        return written if written is not None and written >= 0 else len(params)
