"""Suppressions: a person keeps an entity out of a playbook's actions and escalations for a while.

A suppression is per (playbook, entity) and lasts until a time on the ledger's clock. While it
lasts, recording a plan (:mod:`~autoexec_dagster.executor.recording`) gives the entity no action,
no workflow and no new escalation: its row is recorded as skipped with a detail naming who
suppressed it and until when. After that the entity is routed normally again. The latest decision
sets the period (a second suppression replaces the first); :meth:`Suppressions.lift_suppressions`
ends one early and keeps the record of who did.

Suppressing an escalation closes it (status ``suppressed``) and records the suppression in the
same transaction; suppressing entities directly also closes their open escalations in the
playbook, so no approval can act against the newer "no action" decision.
"""

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import sqlalchemy as sa

from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.engine import chunks
from autoexec_dagster.ledger.escalations import (
    SUPPRESSED,
    EscalationDecision,
    EscalationError,
    Escalations,
    aware,
    check_decider,
    check_note,
    check_via,
)
from autoexec_dagster.ledger.schema import IN_DOUBT, OPEN, RESERVED, SKIPPED
from autoexec_dagster.workflows.durations import parse_duration

# How recording marks the rows of suppressed entities (the detail column starts with it).
SUPPRESSED_DETAIL = "suppressed:"
# Up to this many active suppressions of a playbook are read at once for a plan; beyond it they
# are looked up per chunk of entities.
_LOAD_ALL = 20_000


@dataclass(frozen=True, slots=True)
class Suppression:
    """One entity kept out of a playbook's actions and escalations.

    Attributes:
        playbook: The playbook.
        entity_id: The entity.
        until: When it ends (the ledger's clock).
        suppressed_by: Who suppressed it.
        note: Why.
        via: How: ``cli``, ``link`` or ``python``.
        escalation_key: The escalation whose decision suppressed it, if any.
        created_at: When it was recorded.
        closed_escalations: Open escalations of the entity this call closed as suppressed.
    """

    playbook: str
    entity_id: str
    until: datetime
    suppressed_by: str
    note: str | None = None
    via: str | None = None
    escalation_key: str | None = None
    created_at: datetime | None = None
    closed_escalations: tuple[str, ...] = ()

    def detail(self) -> str:
        """The ledger detail of a row recording stopped: who suppressed it, until when."""
        return f"{SUPPRESSED_DETAIL} by {self.suppressed_by} until {self.until:%Y-%m-%d %H:%M} UTC"


def suppression_period(value: Any) -> timedelta:
    """A suppression period: ``30d``, ``12h``, ``2w`` (as playbooks write durations) or a timedelta.

    Raises:
        EscalationError: It is not a positive duration of at most a century.
    """
    try:
        return parse_duration(value, what="the suppression period (--for)")
    except ValueError as exc:
        raise EscalationError(f"{exc}; nothing was decided") from None


def _suppression(row: Any) -> Suppression:
    until = aware(row.until)
    assert until is not None
    return Suppression(
        playbook=row.playbook,
        entity_id=row.entity_id,
        until=until,
        suppressed_by=row.suppressed_by,
        note=row.note,
        via=row.via,
        escalation_key=row.escalation_key,
        created_at=aware(row.created_at),
    )


class Suppressions(Escalations):
    """Suppress entities per playbook for a period, and read what is suppressed."""

    def suppress_escalations(
        self,
        keys: Iterable[str],
        *,
        for_: timedelta | str | float,
        by: str,
        note: str,
        via: str = "python",
        approvers: Collection[str] | None = None,
    ) -> list[EscalationDecision]:
        """Close open escalations as suppressed and keep their entities out for ``for_``.

        In one transaction: each escalation becomes ``suppressed`` (who, when, how, the note) and
        its (playbook, entity) gets a suppression until now + ``for_`` on the ledger's clock.

        Args:
            keys: Full escalation keys.
            for_: How long: ``"30d"``, ``"12h"``, a number of seconds or a timedelta.
            by: Who suppresses (recorded).
            note: Why (required).
            via: ``cli``, ``link`` or ``python``.
            approvers: When given, only these people may decide.

        Returns:
            What was decided, per key, with ``suppressed_until``.

        Raises:
            EscalationError: The period does not parse, the note is missing, a key is unknown or
                not open, or ``by``/``via`` is bad. Nothing is written.
        """
        period = suppression_period(for_)
        text = check_note(note, required=True, what="a suppression")
        name = check_decider(by, approvers=approvers)
        how = check_via(via)

        def record(conn: sa.Connection, rows: list[Any], stamp: datetime) -> None:
            self._upsert_suppressions(
                conn,
                [(r.playbook, r.entity_id, r.idempotency_key) for r in rows],
                until=stamp + period,
                by=name,
                note=text,
                via=how,
                stamp=stamp,
            )

        return self._decide(
            keys,
            status=SUPPRESSED,
            by=name,
            note=text,
            via=how,
            approvers=approvers,
            what="suppress escalations",
            suppress_for=period,
            also=record,
        )

    def suppress_entities(
        self,
        *,
        playbook: str,
        entity_ids: Iterable[str],
        for_: timedelta | str | float,
        by: str,
        note: str,
        via: str = "python",
    ) -> list[Suppression]:
        """Keep entities out of a playbook's actions and escalations for ``for_``.

        Their open escalations in the playbook are closed as suppressed in the same transaction.

        Args:
            playbook: The playbook (one the ledger has recorded).
            entity_ids: The entities.
            for_: How long: ``"30d"``, ``"12h"``, a number of seconds or a timedelta.
            by: Who suppresses (recorded).
            note: Why (required).
            via: ``cli``, ``link`` or ``python``.

        Returns:
            One suppression per entity, in the order given, with the escalations it closed.

        Raises:
            EscalationError: The playbook is unknown to the ledger, an entity id is blank, the
                period does not parse, the note is missing, or ``by``/``via`` is bad. Nothing is
                written.
        """
        period = suppression_period(for_)
        text = check_note(note, required=True, what="a suppression")
        name = check_decider(by)
        how = check_via(via)
        listed = [entity_ids] if isinstance(entity_ids, str) else list(entity_ids)
        bad = [e for e in listed if not isinstance(e, str) or not e.strip()]
        if bad or not listed:
            raise EscalationError(
                f"entity ids must be non-empty text, got {bad[:3]!r}; nothing was suppressed"
                if bad
                else "no entity given; nothing was suppressed"
            )
        entities = list(dict.fromkeys(listed))
        stamp = self.clock()
        until = stamp + period
        e = schema.escalations
        closed: dict[str, list[str]] = {}
        with self._write("suppress entities") as conn:
            if not self._playbook_known(conn, playbook):
                raise EscalationError(
                    f"the ledger has never seen playbook {playbook!r}, so suppressing its "
                    "entities would stop nothing; nothing was suppressed"
                )
            for chunk in chunks(entities):
                result = conn.execute(
                    sa.update(e)
                    .where(e.c.playbook == playbook, e.c.entity_id.in_(chunk), e.c.status == OPEN)
                    .values(
                        status=SUPPRESSED,
                        resolved_at=stamp,
                        resolved_by=name,
                        resolution=text,
                        decided_via=how,
                    )
                    .returning(e.c.idempotency_key, e.c.entity_id)
                )
                for key, entity in result:
                    closed.setdefault(str(entity), []).append(str(key))
            self._upsert_suppressions(
                conn,
                [(playbook, entity, (closed.get(entity) or [None])[0]) for entity in entities],
                until=until,
                by=name,
                note=text,
                via=how,
                stamp=stamp,
            )
        return [
            Suppression(
                playbook=playbook,
                entity_id=entity,
                until=until,
                suppressed_by=name,
                note=text,
                via=how,
                escalation_key=(closed.get(entity) or [None])[0],
                created_at=stamp,
                closed_escalations=tuple(closed.get(entity, ())),
            )
            for entity in entities
        ]

    def lift_suppressions(
        self, *, playbook: str, entity_ids: Iterable[str], by: str, via: str = "python"
    ) -> list[str]:
        """End active suppressions now; the record keeps who lifted them.

        Returns:
            The entities whose suppression was active and is now lifted.

        Raises:
            EscalationError: ``by`` or ``via`` is bad.
        """
        name = check_decider(by)
        how = check_via(via)
        entities = list(dict.fromkeys([entity_ids] if isinstance(entity_ids, str) else entity_ids))
        stamp = self.clock()
        s = schema.suppressions
        lifted: list[str] = []
        with self._write("lift suppressions") as conn:
            for chunk in chunks(entities):
                result = conn.execute(
                    sa.update(s)
                    .where(s.c.playbook == playbook, s.c.entity_id.in_(chunk), s.c.until > stamp)
                    .values(
                        until=stamp,
                        note=sa.func.coalesce(s.c.note, "")
                        + f" (lifted by {name} via {how} at {stamp:%Y-%m-%d %H:%M} UTC)",
                    )
                    .returning(s.c.entity_id)
                )
                lifted.extend(str(r[0]) for r in result)
        return lifted

    def active_suppressions(
        self,
        *,
        playbook: str,
        entity_ids: Sequence[str] | None = None,
        at: datetime | None = None,
    ) -> dict[str, Suppression]:
        """The playbook's suppressions in force at ``at`` (default: the ledger's clock), by entity.

        Args:
            playbook: The playbook.
            entity_ids: Only these entities (None: every suppressed entity of the playbook).
            at: The moment; the ledger's clock when None.
        """
        moment = at or self.clock()
        s = schema.suppressions
        base = sa.select(s).where(s.c.playbook == playbook, s.c.until > moment)
        found: dict[str, Suppression] = {}
        with self._read("read suppressions") as conn:
            if entity_ids is None:
                for row in conn.execute(base):
                    found[row.entity_id] = _suppression(row)
                return found
            total = conn.execute(
                sa.select(sa.func.count()).where(s.c.playbook == playbook, s.c.until > moment)
            ).scalar_one()
            if not total:
                # The common case: nothing suppressed, one indexed count and no IN lists.
                return found
            listed = list(dict.fromkeys(str(e) for e in entity_ids))
            if total <= _LOAD_ALL or total <= len(listed):
                wanted = set(listed)
                for row in conn.execute(base):
                    if row.entity_id in wanted:
                        found[row.entity_id] = _suppression(row)
                return found
            for chunk in chunks(listed):
                for row in conn.execute(base.where(s.c.entity_id.in_(chunk))):
                    found[row.entity_id] = _suppression(row)
        return found

    def suppressions(
        self, *, playbook: str | None = None, active_only: bool = True
    ) -> pd.DataFrame:
        """Suppression rows (those in force now by default), ending soonest first."""
        s = schema.suppressions
        query = sa.select(s).order_by(s.c.until, s.c.playbook, s.c.entity_id)
        if playbook is not None:
            query = query.where(s.c.playbook == playbook)
        if active_only:
            query = query.where(s.c.until > self.clock())
        with self._read("list suppressions") as conn:
            return pd.read_sql(query, conn)

    def skip_suppressed(self, details: Mapping[str, str]) -> list[str]:
        """Move pending actions (reserved or in doubt) of suppressed entities to ``skipped``.

        An earlier run reserved them and died before sending; the entity has been suppressed
        since, so they are not sent. Rows another worker holds are left alone.

        Args:
            details: Per action key, the detail to record (who suppressed it, until when).

        Returns:
            The keys moved.
        """
        t = schema.actions
        moved: list[str] = []
        stamp = self.clock()
        with self._write("skip actions of suppressed entities") as conn:
            for key, detail in details.items():
                result = conn.execute(
                    sa.update(t)
                    .where(t.c.idempotency_key == key, t.c.state.in_([RESERVED, IN_DOUBT]))
                    .values(
                        state=SKIPPED,
                        detail=detail[:500],
                        payload=None,
                        worker=None,
                        lease_expires_at=None,
                        updated_at=stamp,
                        completed_at=stamp,
                    )
                )
                if result.rowcount:
                    moved.append(key)
        return moved

    def _playbook_known(self, conn: sa.Connection, playbook: str) -> bool:
        for table in (schema.actions, schema.escalations):
            hit = conn.execute(
                sa.select(table.c.playbook).where(table.c.playbook == playbook).limit(1)
            ).first()
            if hit is not None:
                return True
        return False

    def _upsert_suppressions(
        self,
        conn: sa.Connection,
        targets: Sequence[tuple[str, str, str | None]],
        *,
        until: datetime,
        by: str,
        note: str | None,
        via: str,
        stamp: datetime,
    ) -> None:
        """One suppression per (playbook, entity, escalation key or None); the latest decision
        sets the period."""
        s = schema.suppressions
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement: Any = pg_insert(s)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(s)
        statement = statement.on_conflict_do_update(
            index_elements=[s.c.playbook, s.c.entity_id],
            set_={
                column: statement.excluded[column]
                for column in ("until", "suppressed_by", "note", "via", "escalation_key")
            }
            | {"created_at": statement.excluded.created_at},
        )
        unique = {(playbook, entity): key for playbook, entity, key in targets}
        values = [
            {
                "playbook": playbook,
                "entity_id": entity,
                "until": until,
                "suppressed_by": by,
                "note": note,
                "via": via,
                "escalation_key": key,
                "created_at": stamp,
            }
            for (playbook, entity), key in unique.items()
        ]
        for chunk in chunks(values):
            conn.execute(statement, list(chunk))
