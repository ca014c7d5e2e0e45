"""Read queries over the ledger, as metadata, sensors and the command line use them.

Every query runs in a read transaction (no write lock on SQLite) and is bounded or aggregated, so
its cost does not grow with a partition's size where a caller shows only a preview.
"""

from collections.abc import Iterable, Sequence
from datetime import datetime

import pandas as pd
import sqlalchemy as sa

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
