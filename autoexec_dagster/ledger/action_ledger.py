"""The action ledger: the durable record of every action, the outbox and the escalation queue.

Delivery protocol (see DESIGN.md, "Delivery"):

1. ``reserve``: one row per action, ``INSERT .. ON CONFLICT DO NOTHING`` keyed by the
   idempotency key, before any side effect. A key that exists is never reserved twice.
2. ``claim``: move reserved rows to ``sending`` under a lease, atomically: ``BEGIN IMMEDIATE``
   on SQLite, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL. Two workers never claim the same row.
3. ``complete``: record outcomes in batches; only the worker holding the claim may complete it.
4. ``recover``: rows left in ``sending`` by a dead worker (its lease ran out, or its process on
   this host is gone) become ``in_doubt``: at-least-once actions are claimed again with the same
   key, at-most-once actions are escalated for a person to reconcile.
"""

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import StaticPool

from autoexec_dagster.errors import LedgerError
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.schema import (
    ESCALATED,
    FINAL_STATES,
    IN_DOUBT,
    RESERVED,
    SENDING,
)

DEFAULT_LEDGER_URL = "sqlite:///autoexec_ledger.db"
_READ_ONLY = "autoexec_read_only"
_CHUNK = 500
_HOST = socket.gethostname()


def _now() -> datetime:
    return datetime.now(UTC)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def new_worker_id() -> str:
    """An id for one executing process: ``host:pid:random``, so recovery can test liveness."""
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _worker_is_dead(worker: str | None) -> bool:
    """True only when the worker ran on this host and its process no longer exists."""
    if not worker:
        return False
    host, _, rest = worker.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one claimed action ended, as written by :meth:`ActionLedger.complete`.

    Attributes:
        key: Idempotency key.
        state: A final state (succeeded, failed, escalated).
        attempts: Attempts made by this worker.
        detail: Short receipt or status (``"HTTP 200"``).
        error: Error text of the last failure, without secrets.
        request_digest: Digest of the request as sent.
        escalation_kind: When set, an escalation is opened with this kind and ``error`` as reason.
    """

    key: str
    state: str
    attempts: int
    detail: str | None = None
    error: str | None = None
    request_digest: str | None = None
    escalation_kind: str | None = None


class ActionLedger:
    """Durable record of every action, backed by SQLite (default) or PostgreSQL.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:///ledger.db`` or
            ``postgresql+psycopg://user@host/db``. The schema is created or migrated on open.
        echo: Log SQL statements (debugging).

    Raises:
        LedgerError: The URL is malformed, its driver is missing, or the database cannot be opened
            or migrated. The message masks any password.
    """

    def __init__(self, url: str = DEFAULT_LEDGER_URL, *, echo: bool = False):
        try:
            parsed = sa.make_url(url)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise LedgerError(
                f"the action ledger URL {url!r} is not a valid SQLAlchemy URL: {exc}"
            ) from None
        self.url = parsed
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise LedgerError(
                f"the action ledger supports SQLite and PostgreSQL, not {self.dialect!r} "
                f"({self.display_url})"
            )
        try:
            self.engine = self._create_engine(parsed, echo=echo)
            self._setup_schema()
        except LedgerError:
            raise
        except ModuleNotFoundError as exc:
            raise LedgerError(
                f"cannot open the action ledger at {self.display_url}: driver {exc.name!r} is not "
                "installed (for PostgreSQL: pip install 'autoexec-dagster[postgres]')"
            ) from None
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise LedgerError(
                f"cannot open the action ledger at {self.display_url}: {reason}"
            ) from None

    def _create_engine(self, url: sa.URL, *, echo: bool) -> sa.Engine:
        if self.dialect == "postgresql":
            return sa.create_engine(url, echo=echo, pool_pre_ping=True, future=True)
        database = url.database or ""
        in_memory = database in ("", ":memory:")
        if not in_memory:
            folder = os.path.dirname(os.path.abspath(database))
            if not os.path.isdir(folder):
                raise LedgerError(
                    f"cannot open the action ledger at {self.display_url}: folder {folder!r} does "
                    "not exist"
                )
        engine = sa.create_engine(
            url,
            echo=echo,
            connect_args={"timeout": 60, "check_same_thread": False},
            poolclass=StaticPool if in_memory else None,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so every transaction is BEGIN IMMEDIATE:
            # a read-then-write under BEGIN DEFERRED fails with "database is locked".
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            # Reads (marked by _reading) take no write lock; WAL gives them a consistent snapshot.
            if connection.get_execution_options().get(_READ_ONLY):
                connection.exec_driver_sql("BEGIN")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def _setup_schema(self) -> None:
        try:
            schema.metadata.create_all(self.engine, checkfirst=True)
        except (sa_exc.OperationalError, sa_exc.ProgrammingError, sa_exc.IntegrityError):
            # Another process created the tables between our check and our CREATE.
            schema.metadata.create_all(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            conn.execute(
                self._insert_ignore(schema.schema_version, "id"),
                [{"id": 1, "version": schema.SCHEMA_VERSION, "migrated_at": _now()}],
            )
            version = conn.execute(
                sa.select(schema.schema_version.c.version).where(schema.schema_version.c.id == 1)
            ).scalar_one()
            if version > schema.SCHEMA_VERSION:
                raise LedgerError(
                    f"the action ledger at {self.display_url} has schema version {version}, newer "
                    f"than this release supports ({schema.SCHEMA_VERSION}); upgrade autoexec-dagster"
                )
            while version < schema.SCHEMA_VERSION:
                schema.MIGRATIONS[version](conn)
                version += 1
                conn.execute(
                    sa.update(schema.schema_version)
                    .where(schema.schema_version.c.id == 1)
                    .values(version=version, migrated_at=_now())
                )

    @property
    def schema_version(self) -> int:
        """The schema version stored in the ledger."""
        with self._reading() as conn:
            return conn.execute(sa.select(schema.schema_version.c.version)).scalar_one()

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    def _reading(self) -> sa.Connection:
        """A connection for reads: on SQLite its transactions do not take the write lock."""
        return self.engine.connect().execution_options(**{_READ_ONLY: True})

    def __repr__(self) -> str:
        return f"ActionLedger({self.display_url!r})"

    def _insert_ignore(self, table: sa.Table, key: str) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing(index_elements=[key])
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing(index_elements=[key])

    # -- writing: the delivery protocol ------------------------------------------------------

    def reserve(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert action rows that do not exist yet; existing keys are left untouched.

        Each row holds the columns of ``autoexec_actions`` (at least idempotency_key, playbook,
        playbook_version, insight, partition_key, entity_id, rule, action, decision, state).

        Returns:
            The keys inserted by this call (``INSERT .. ON CONFLICT DO NOTHING RETURNING``), so
            a concurrent worker's rows are never mistaken for ours.
        """
        if not rows:
            return []
        now = _now()
        t = schema.actions
        statement = self._insert_ignore(t, "idempotency_key").returning(t.c.idempotency_key)
        inserted: list[str] = []
        with self.engine.begin() as conn:
            for chunk in _chunks(rows, 5_000):
                result = conn.execute(
                    statement, [{"created_at": now, "updated_at": now, **row} for row in chunk]
                )
                inserted.extend(row[0] for row in result)
        return inserted

    def states(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """Current ``(state, worker)`` of each existing key."""
        found: dict[str, tuple[str, str | None]] = {}
        t = schema.actions
        with self._reading() as conn:
            for chunk in _chunks(keys):
                for key, state, worker in conn.execute(
                    sa.select(t.c.idempotency_key, t.c.state, t.c.worker).where(
                        t.c.idempotency_key.in_(chunk)
                    )
                ):
                    found[key] = (state, worker)
        return found

    def recover(self, keys: Sequence[str], *, now: float | None = None) -> dict[str, str]:
        """Mark actions left in ``sending`` by a dead worker as ``in_doubt``.

        A worker is dead when its lease expired, or when it ran on this host and its process is
        gone. Live workers' claims are left alone.

        Returns:
            Recovered keys mapped to their delivery mode (at_least_once or at_most_once).
        """
        t = schema.actions
        moment = time.time() if now is None else now
        recovered: dict[str, str] = {}
        with self.engine.begin() as conn:
            for chunk in _chunks(keys):
                rows = conn.execute(
                    sa.select(t.c.idempotency_key, t.c.worker, t.c.lease_expires_at, t.c.delivery)
                    .where(t.c.idempotency_key.in_(chunk), t.c.state == SENDING)
                    .with_for_update()
                ).all()
                stale = [
                    (key, delivery)
                    for key, worker, lease, delivery in rows
                    if (lease is not None and lease < moment) or _worker_is_dead(worker)
                ]
                if stale:
                    conn.execute(
                        sa.update(t)
                        .where(t.c.idempotency_key.in_([k for k, _ in stale]), t.c.state == SENDING)
                        .values(
                            state=IN_DOUBT, worker=None, lease_expires_at=None, updated_at=_now()
                        )
                    )
                    recovered.update(stale)
        return recovered

    def claim(
        self, keys: Sequence[str], *, worker: str, lease_seconds: float, run_id: str | None
    ) -> list[str]:
        """Atomically move claimable actions to ``sending`` for this worker.

        Claimable: ``reserved``, or ``in_doubt`` with at-least-once delivery. Rows claimed by
        another worker are skipped, never waited for.

        Returns:
            The keys this worker now holds; only these may be sent.
        """
        t = schema.actions
        claimable = sa.or_(
            t.c.state == RESERVED,
            sa.and_(t.c.state == IN_DOUBT, t.c.delivery == "at_least_once"),
        )
        values = {
            "state": SENDING,
            "worker": worker,
            "lease_expires_at": time.time() + lease_seconds,
            "run_id": run_id,
            "updated_at": _now(),
        }
        claimed: list[str] = []
        with self.engine.begin() as conn:
            for chunk in _chunks(keys):
                if self.dialect == "postgresql":
                    locked = (
                        sa.select(t.c.idempotency_key)
                        .where(t.c.idempotency_key.in_(chunk), claimable)
                        .with_for_update(skip_locked=True)
                    )
                    where = t.c.idempotency_key.in_(locked)
                else:
                    # BEGIN IMMEDIATE already holds SQLite's single write lock.
                    where = sa.and_(t.c.idempotency_key.in_(chunk), claimable)
                result = conn.execute(
                    sa.update(t).where(where).values(**values).returning(t.c.idempotency_key)
                )
                claimed.extend(row[0] for row in result)
        return claimed

    def heartbeat(self, *, worker: str, lease_seconds: float) -> int:
        """Extend the lease of every action this worker holds; returns how many."""
        t = schema.actions
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(t)
                .where(t.c.worker == worker, t.c.state == SENDING)
                .values(lease_expires_at=time.time() + lease_seconds)
            )
            return result.rowcount or 0

    def release(self, keys: Sequence[str], *, worker: str) -> None:
        """Give claimed but unsent actions back (state ``reserved``), e.g. on pause."""
        t = schema.actions
        with self.engine.begin() as conn:
            for chunk in _chunks(keys):
                conn.execute(
                    sa.update(t)
                    .where(
                        t.c.idempotency_key.in_(chunk), t.c.worker == worker, t.c.state == SENDING
                    )
                    .values(state=RESERVED, worker=None, lease_expires_at=None, updated_at=_now())
                )

    def complete(
        self,
        outcomes: Sequence[Outcome],
        *,
        worker: str,
        escalation_context: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Record outcomes of claimed actions in one transaction.

        Only rows still held by ``worker`` in ``sending`` are updated, so a worker whose claim was
        recovered by another cannot overwrite the newer outcome.

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
        now = _now()
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
                lease_expires_at=None,
                updated_at=now,
                completed_at=now,
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
            }
            for o in outcomes
        ]
        escalated = [o for o in outcomes if o.escalation_kind]
        with self.engine.begin() as conn:
            result = conn.execute(statement, params)
            if escalated:
                context = escalation_context or {}
                conn.execute(
                    self._insert_ignore(schema.escalations, "idempotency_key"),
                    [
                        _escalation_row(
                            key=o.key,
                            kind=o.escalation_kind or "delivery_failed",
                            reason=o.error or "delivery failed",
                            context=context.get(o.key, {}),
                            now=now,
                        )
                        for o in escalated
                    ],
                )
        return (
            result.rowcount if result.rowcount is not None and result.rowcount >= 0 else len(params)
        )

    def escalate_actions(
        self,
        keys: Sequence[str],
        *,
        kind: str,
        reason: str,
        context: Mapping[str, Mapping[str, Any]],
        from_states: Iterable[str] = (RESERVED, IN_DOUBT),
    ) -> list[str]:
        """Move actions that were never sent (or are in doubt) to ``escalated`` and open escalations.

        Returns:
            Keys that were escalated by this call.
        """
        t = schema.actions
        now = _now()
        done: list[str] = []
        with self.engine.begin() as conn:
            for chunk in _chunks(keys):
                result = conn.execute(
                    sa.update(t)
                    .where(t.c.idempotency_key.in_(chunk), t.c.state.in_(list(from_states)))
                    .values(state=ESCALATED, error=reason, updated_at=now, completed_at=now)
                    .returning(t.c.idempotency_key)
                )
                moved = [row[0] for row in result]
                if moved:
                    conn.execute(
                        self._insert_ignore(schema.escalations, "idempotency_key"),
                        [
                            _escalation_row(
                                key=k, kind=kind, reason=reason, context=context.get(k, {}), now=now
                            )
                            for k in moved
                        ],
                    )
                done.extend(moved)
        return done

    def open_escalations(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert escalations that do not exist yet; returns the keys inserted now.

        Each row holds idempotency_key, playbook, playbook_version, insight, partition_key,
        entity_id, rule, kind, reason and data (a mapping, stored as JSON).
        """
        if not rows:
            return []
        keys = [r["idempotency_key"] for r in rows]
        existing = self._existing_escalations(keys)
        now = _now()
        fresh = [r for r in rows if r["idempotency_key"] not in existing]
        if fresh:
            with self.engine.begin() as conn:
                for chunk in _chunks(fresh, 5_000):
                    conn.execute(
                        self._insert_ignore(schema.escalations, "idempotency_key"),
                        [
                            {
                                **{k: v for k, v in r.items() if k != "data"},
                                "data": _to_json(r.get("data", {})),
                                "status": "open",
                                "created_at": now,
                            }
                            for r in chunk
                        ],
                    )
        return [r["idempotency_key"] for r in fresh]

    def _existing_escalations(self, keys: Sequence[str]) -> set[str]:
        t = schema.escalations
        found: set[str] = set()
        with self._reading() as conn:
            for chunk in _chunks(keys):
                found.update(
                    conn.execute(
                        sa.select(t.c.idempotency_key).where(t.c.idempotency_key.in_(chunk))
                    ).scalars()
                )
        return found

    def resolve_escalation(self, key: str, *, by: str, resolution: str = "") -> bool:
        """Close an open escalation; returns False when no open escalation has that key."""
        t = schema.escalations
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(t)
                .where(t.c.idempotency_key == key, t.c.status == "open")
                .values(
                    status="resolved", resolved_at=_now(), resolved_by=by, resolution=resolution
                )
            )
            return bool(result.rowcount)

    # -- the kill switch ---------------------------------------------------------------------

    def pause(self, scope: str = "*", *, reason: str, by: str) -> None:
        """Stop a playbook (or every playbook, scope ``"*"``) before its next action."""
        self._set_control(scope, paused=True, reason=reason, by=by)

    def resume(self, scope: str = "*", *, by: str) -> None:
        """Lift a pause set with :meth:`pause`."""
        self._set_control(scope, paused=False, reason=None, by=by)

    def _set_control(self, scope: str, *, paused: bool, reason: str | None, by: str) -> None:
        t = schema.controls
        values = {"paused": paused, "reason": reason, "updated_by": by, "updated_at": _now()}
        with self.engine.begin() as conn:
            updated = conn.execute(sa.update(t).where(t.c.scope == scope).values(**values))
            if not updated.rowcount:
                conn.execute(sa.insert(t).values(scope=scope, **values))

    def pause_reason(self, playbook: str) -> str | None:
        """Why ``playbook`` is paused (globally or by name), or None when it may run."""
        t = schema.controls
        with self._reading() as conn:
            rows = conn.execute(
                sa.select(t.c.scope, t.c.reason, t.c.updated_by).where(
                    t.c.scope.in_(["*", playbook]), t.c.paused.is_(True)
                )
            ).all()
        if not rows:
            return None
        scope, reason, by = sorted(rows, key=lambda r: r[0] != "*")[0]
        target = "every playbook" if scope == "*" else f"playbook {scope!r}"
        return f"{target} is paused by {by}: {reason}"

    def controls(self) -> pd.DataFrame:
        """The kill-switch table."""
        with self._reading() as conn:
            return pd.read_sql(sa.select(schema.controls), conn)

    # -- reading -----------------------------------------------------------------------------

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
        with self._reading() as conn:
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
        with self._reading() as conn:
            return {state: int(n) for state, n in conn.execute(query)}

    def actions(
        self,
        *,
        playbook: str | None = None,
        partition_key: str | None = None,
        states: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Action rows, newest first."""
        t = schema.actions
        query = sa.select(t).order_by(t.c.updated_at.desc())
        if playbook is not None:
            query = query.where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        if states is not None:
            query = query.where(t.c.state.in_(list(states)))
        if limit is not None:
            query = query.limit(limit)
        with self._reading() as conn:
            return pd.read_sql(query, conn)

    def escalations(
        self,
        *,
        playbook: str | None = None,
        partition_key: str | None = None,
        status: str | None = "open",
        limit: int | None = None,
    ) -> pd.DataFrame:
        """The escalation queue: what a person should look at, oldest first."""
        t = schema.escalations
        query = sa.select(t).order_by(t.c.created_at, t.c.idempotency_key)
        if playbook is not None:
            query = query.where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        if status is not None:
            query = query.where(t.c.status == status)
        if limit is not None:
            query = query.limit(limit)
        with self._reading() as conn:
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
        with self._reading() as conn:
            for chunk in _chunks(list(dict.fromkeys(entity_ids))):
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
        return sum(1 for state, _ in self.states(keys).values() if state in FINAL_STATES)


def _to_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, default=str, sort_keys=True)


def _escalation_row(
    *, key: str, kind: str, reason: str, context: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "playbook": context.get("playbook", ""),
        "playbook_version": context.get("playbook_version", ""),
        "insight": context.get("insight", ""),
        "partition_key": context.get("partition_key", ""),
        "entity_id": context.get("entity_id", ""),
        "rule": context.get("rule", ""),
        "kind": kind,
        "reason": reason,
        "data": _to_json(context.get("data", {})),
        "status": "open",
        "created_at": now,
    }
