"""The escalation queue: what a person should look at, and why.

An escalation is keyed like the action it stands for, so re-running a partition never opens it
twice. Rule escalations also carry a case key (playbook, rule, entity): while one is open, the same
rule does not escalate the same entity again from a later partition. A partial unique index holds
that under concurrency; inserts are ``ON CONFLICT DO NOTHING`` with no check-then-insert.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.engine import LedgerBase, chunks, now
from autoexec_dagster.ledger.schema import ESCALATED, IN_DOUBT, OPEN, RESERVED


def to_json(data: Mapping[str, Any]) -> str:
    """Escalation data as JSON text (values a person reads; unknown types as text)."""
    return json.dumps(data, default=str, sort_keys=True)


def escalation_row(
    *, key: str, kind: str, reason: str, context: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """The ``autoexec_escalations`` row for one escalated action."""
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
        "data": to_json(context.get("data", {})),
        "status": OPEN,
        "dedupe_key": context.get("dedupe_key") or key,
        "created_at": now,
    }


class Escalations(LedgerBase):
    """Open, dedupe and resolve escalations."""

    def open_escalations(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert escalations that do not exist yet; returns the keys inserted by this call.

        Each row holds idempotency_key, playbook, playbook_version, insight, partition_key,
        entity_id, rule, kind, reason, data (a mapping, stored as JSON) and optionally
        dedupe_key (the case: a row whose case is already open is not inserted).
        """
        if not rows:
            return []
        stamp = now()
        t = schema.escalations
        statement = self._insert_ignore(t).returning(t.c.idempotency_key)
        inserted: list[str] = []
        with self._write("open escalations") as conn:
            for chunk in chunks(rows, 5_000):
                values = [
                    {
                        **{k: v for k, v in r.items() if k != "data"},
                        "data": to_json(r.get("data", {})),
                        "status": OPEN,
                        "dedupe_key": r.get("dedupe_key") or r["idempotency_key"],
                        "created_at": stamp,
                    }
                    for r in chunk
                ]
                inserted.extend(row[0] for row in conn.execute(statement, values))
        return inserted

    def open_cases(self, dedupe_keys: Sequence[str]) -> dict[str, str]:
        """The partition each open case was opened in, for the cases that are open."""
        t = schema.escalations
        found: dict[str, str] = {}
        with self._read("read open escalation cases") as conn:
            for chunk in chunks(list(dict.fromkeys(dedupe_keys))):
                for dedupe, partition in conn.execute(
                    sa.select(t.c.dedupe_key, t.c.partition_key).where(
                        t.c.dedupe_key.in_(chunk), t.c.status == OPEN
                    )
                ):
                    found[dedupe] = partition
        return found

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
        stamp = now()
        done: list[str] = []
        with self._write("escalate actions") as conn:
            for chunk in chunks(keys):
                result = conn.execute(
                    sa.update(t)
                    .where(t.c.idempotency_key.in_(chunk), t.c.state.in_(list(from_states)))
                    .values(
                        state=ESCALATED,
                        error=reason,
                        payload=None,
                        worker=None,
                        lease_expires_at=None,
                        updated_at=stamp,
                        completed_at=stamp,
                    )
                    .returning(t.c.idempotency_key)
                )
                moved = [row[0] for row in result]
                if moved:
                    conn.execute(
                        self._insert_ignore(schema.escalations),
                        [
                            escalation_row(
                                key=k,
                                kind=kind,
                                reason=reason,
                                context=context.get(k, {}),
                                now=stamp,
                            )
                            for k in moved
                        ],
                    )
                done.extend(moved)
        return done

    def resolve_escalation(self, key: str, *, by: str, resolution: str = "") -> bool:
        """Close an open escalation; returns False when no open escalation has that key."""
        t = schema.escalations
        with self._write("resolve an escalation") as conn:
            result = conn.execute(
                sa.update(t)
                .where(t.c.idempotency_key == key, t.c.status == OPEN)
                .values(
                    status=schema.RESOLVED,
                    resolved_at=now(),
                    resolved_by=by,
                    resolution=resolution,
                )
            )
            return bool(result.rowcount)
