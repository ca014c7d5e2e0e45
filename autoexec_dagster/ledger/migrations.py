"""In-place migrations of the action ledger: ``MIGRATIONS[n]`` takes version n to n + 1.

Each runs inside the transaction that records the new version, so a failed migration leaves the
ledger at the old version, untouched.
"""

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from autoexec_dagster.keys import (
    BATCH_ENTITY,
    batch_key,
    escalation_dedupe_key,
    idempotency_keys,
    key_label,
)
from autoexec_dagster.ledger import schema

Migration = Callable[[sa.Connection], None]
_DRY = "dry:"
# Which of several version-1 rows for one side effect survives: the one that did the most.
_RANK = {
    schema.SUCCEEDED: 0,
    schema.SENDING: 1,
    schema.IN_DOUBT: 2,
    schema.FAILED: 3,
    schema.ESCALATED: 4,
    schema.RESERVED: 5,
    schema.HELD_OUT: 6,
    schema.SKIPPED: 7,
    schema.DRY_RUN: 8,
}


def _new_action_key(row: Any) -> str:
    dry = row.idempotency_key.startswith(_DRY)
    key = idempotency_keys(
        insight=row.insight,
        partition_key=row.partition_key,
        actions=[key_label(row.action, row.decision, row.rule)],
        entity_ids=[row.entity_id],
    )[0]
    return _DRY + key if dry else key


def _to_v2(conn: sa.Connection) -> None:
    """Keys without the playbook version; outbox payload and output; escalation dedupe keys;
    workflow instances, whose step attempts are actions naming their instance and step."""
    for table, column in (
        ("autoexec_actions", "payload"),
        ("autoexec_actions", "output"),
        ("autoexec_escalations", "dedupe_key"),
        ("autoexec_actions", "instance_id"),
        ("autoexec_actions", "step"),
    ):
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} TEXT"))
    schema.superseded_actions.create(conn, checkfirst=True)
    schema.workflow_instances.create(conn, checkfirst=True)
    conn.execute(
        sa.text(
            "CREATE INDEX IF NOT EXISTS ix_autoexec_actions_instance ON autoexec_actions (instance_id)"
        )
    )
    now = datetime.now(UTC)

    a = schema.actions
    rows = conn.execute(
        sa.select(
            a.c.idempotency_key,
            a.c.insight,
            a.c.partition_key,
            a.c.entity_id,
            a.c.action,
            a.c.decision,
            a.c.rule,
            a.c.state,
            a.c.playbook,
            a.c.playbook_version,
            a.c.run_id,
            a.c.completed_at,
        )
    ).all()
    groups: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        groups[_new_action_key(row)].append(row)
    renamed: dict[str, str] = {}
    superseded: list[dict[str, Any]] = []
    for new_key, members in groups.items():
        members.sort(key=lambda r: (_RANK.get(r.state, 9), r.completed_at or now))
        keep, *rest = members
        renamed[keep.idempotency_key] = new_key
        for row in rest:
            renamed[row.idempotency_key] = new_key
            superseded.append(
                {
                    "old_key": row.idempotency_key,
                    "idempotency_key": new_key,
                    "playbook": row.playbook,
                    "playbook_version": row.playbook_version,
                    "partition_key": row.partition_key,
                    "entity_id": row.entity_id,
                    "action": row.action,
                    "state": row.state,
                    "run_id": row.run_id,
                    "completed_at": row.completed_at,
                    "migrated_at": now,
                }
            )
    if superseded:
        conn.execute(sa.insert(schema.superseded_actions), superseded)
        gone = [r["old_key"] for r in superseded]
        for start in range(0, len(gone), 500):
            conn.execute(sa.delete(a).where(a.c.idempotency_key.in_(gone[start : start + 500])))
    dropped = {r["old_key"] for r in superseded}
    moves = [
        {"old": old, "new": new}
        for old, new in renamed.items()
        if old != new and old not in dropped
    ]
    if moves:
        conn.execute(
            sa.update(a)
            .where(a.c.idempotency_key == sa.bindparam("old"))
            .values(idempotency_key=sa.bindparam("new")),
            moves,
        )

    e = schema.escalations
    cases = conn.execute(
        sa.select(
            e.c.idempotency_key,
            e.c.playbook,
            e.c.insight,
            e.c.partition_key,
            e.c.entity_id,
            e.c.rule,
            e.c.kind,
            e.c.status,
        ).order_by(e.c.created_at)
    ).all()
    open_cases: set[str] = set()
    taken: set[str] = set()
    duplicates: list[str] = []
    updates: list[dict[str, Any]] = []
    for case in cases:
        if case.entity_id == BATCH_ENTITY:
            new_key = batch_key(insight=case.insight, partition_key=case.partition_key)
        else:
            new_key = (
                renamed.get(case.idempotency_key)
                or idempotency_keys(
                    insight=case.insight,
                    partition_key=case.partition_key,
                    actions=[key_label(None, "escalate", case.rule)],
                    entity_ids=[case.entity_id],
                )[0]
            )
        if new_key in taken:
            # The same case, opened again under another playbook version of version 1.
            duplicates.append(case.idempotency_key)
            continue
        taken.add(new_key)
        dedupe = new_key
        if case.kind == "rule":
            dedupe = escalation_dedupe_key(
                playbook=case.playbook, entity_id=case.entity_id, rule=case.rule
            )
            # Version 1 opened one case per day; the oldest open one stays the case, the later
            # duplicates keep their own key so the unique index holds.
            if case.status == schema.OPEN and dedupe in open_cases:
                dedupe = new_key
            elif case.status == schema.OPEN:
                open_cases.add(dedupe)
        updates.append({"old": case.idempotency_key, "new": new_key, "dedupe": dedupe})
    for start in range(0, len(duplicates), 500):
        conn.execute(sa.delete(e).where(e.c.idempotency_key.in_(duplicates[start : start + 500])))
    if updates:
        conn.execute(
            sa.update(e)
            .where(e.c.idempotency_key == sa.bindparam("old"))
            .values(idempotency_key=sa.bindparam("new"), dedupe_key=sa.bindparam("dedupe")),
            updates,
        )
    conn.execute(
        sa.text(
            "CREATE UNIQUE INDEX IF NOT EXISTS ux_autoexec_escalations_open_case "
            "ON autoexec_escalations (dedupe_key) WHERE status = 'open'"
        )
    )


def _to_v3(conn: sa.Connection) -> None:
    """Approval requests and decisions; proposed actions on escalations; suppressions."""
    for column in ("proposed_action", "decided_via"):
        conn.execute(sa.text(f"ALTER TABLE autoexec_escalations ADD COLUMN {column} TEXT"))
    for table in (schema.approvals, schema.approval_decisions, schema.suppressions):
        table.create(conn, checkfirst=True)


def _to_v4(conn: sa.Connection) -> None:
    """Experiments, assignments, periods and their events; exposures; outcomes; action variants."""
    conn.execute(sa.text("ALTER TABLE autoexec_actions ADD COLUMN variant TEXT"))
    for table in (
        schema.experiments,
        schema.experiment_assignments,
        schema.experiment_periods,
        schema.experiment_events,
        schema.exposures,
        schema.outcomes,
    ):
        table.create(conn, checkfirst=True)


def _to_v5(conn: sa.Connection) -> None:
    """Budgets: what each budget spent, and the rows writers lock to spend it atomically."""
    for table in (schema.budget_spend, schema.budget_locks):
        table.create(conn, checkfirst=True)


MIGRATIONS: dict[int, Migration] = {1: _to_v2, 2: _to_v3, 3: _to_v4, 4: _to_v5}
