"""The escalation queue: what a person should look at, and why, and what the person decided.

An escalation is keyed like the action it stands for, so re-running a partition never opens it
twice. Rule escalations also carry a case key (playbook, rule, entity): while one is open, the same
rule does not escalate the same entity again from a later partition. A partial unique index holds
that under concurrency; inserts are ``ON CONFLICT DO NOTHING`` with no check-then-insert.

A person decides an open escalation once: approve its proposed action, reject it, suppress the
entity for a while (:mod:`~autoexec_dagster.ledger.suppressions`) or resolve it with a note. Every
decision records who, when, how (``cli``, ``link``, ``python``) and the note, and is guarded by the
escalation still being open, so a second decision, or one racing another, changes nothing. A
decision call is all-or-nothing: when any key is unknown or no longer open, or the input is bad,
nothing is written and the error names each problem.

Approving writes, in the same transaction, the reserved outbox row of the proposed action (keyed
by :func:`approved_action_key`), so a crash after the decision loses nothing and the delivery
engine sends it exactly as any other action
(:func:`~autoexec_dagster.executor.escalation_actions.deliver_approved_escalations`).
"""

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import sqlalchemy as sa

from autoexec_dagster.errors import EscalationError, PlaybookError
from autoexec_dagster.expressions import parse_expression
from autoexec_dagster.keys import SEP
from autoexec_dagster.ledger import payload, schema
from autoexec_dagster.ledger.engine import LedgerBase, chunks, now
from autoexec_dagster.ledger.schema import (
    APPROVED,
    ESCALATED,
    IN_DOUBT,
    OPEN,
    REJECTED,
    RESERVED,
    RESOLVED,
    SENDING,
)

SUPPRESSED = "suppressed"
DECIDED_STATUSES: tuple[str, ...] = (APPROVED, REJECTED, SUPPRESSED, RESOLVED)
ESCALATION_STATUSES: tuple[str, ...] = (OPEN, *DECIDED_STATUSES)
VIAS: tuple[str, ...] = ("cli", "link", "python")
# The decision recorded on the outbox row of an approved proposed action: a person chose it, so
# the partition's totals do not count it as an autonomous action of the playbook.
APPROVED_DECISION = "approved"
# Ledger columns a listing may be sorted by (the name people use -> the column).
SORT_COLUMNS: dict[str, str] = {
    "created_at": "created_at",
    "decided_at": "resolved_at",
    "resolved_at": "resolved_at",
    "decided_by": "resolved_by",
    "partition": "partition_key",
    "partition_key": "partition_key",
    "entity_id": "entity_id",
    "rule": "rule",
    "kind": "kind",
    "status": "status",
    "reason": "reason",
    "proposed_action": "proposed_action",
    "key": "idempotency_key",
}
_MAX_DECIDER = 200
_SHOWN_PROBLEMS = 10
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_PENDING_OUTBOX = (RESERVED, IN_DOUBT, SENDING)


def to_json(data: Mapping[str, Any]) -> str:
    """Escalation data as JSON text (values a person reads; unknown types as text)."""
    return json.dumps(data, default=str, sort_keys=True)


def approved_action_key(escalation_key: str) -> str:
    """The idempotency key of the action an approval of ``escalation_key`` executes.

    Derived from the escalation alone, so the same approval can never reserve two actions, and
    distinct from every key routing makes (those hash insight, partition, action and entity).
    """
    text = SEP.join(("approved", escalation_key))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


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


@dataclass(frozen=True, slots=True)
class EscalationDecision:
    """What one decision did to one escalation.

    Attributes:
        key: The escalation's key.
        status: Its status now (approved, rejected, suppressed or resolved).
        playbook: The playbook that escalated it.
        partition_key: The partition it was opened in.
        entity_id: The entity.
        decided_by: Who decided.
        decided_at: When (the ledger's clock).
        via: How: ``cli``, ``link`` or ``python``.
        note: The note, if any.
        proposed_action: The action it proposed, if any.
        action_key: For an approval: the key of the reserved action that executes the proposal.
        suppressed_until: For a suppression: until when the entity gets no action or escalation.
    """

    key: str
    status: str
    playbook: str
    partition_key: str
    entity_id: str
    decided_by: str
    decided_at: datetime
    via: str
    note: str | None = None
    proposed_action: str | None = None
    action_key: str | None = None
    suppressed_until: datetime | None = None

    def describe(self) -> str:
        """One line for a person: what was decided, by whom, and what happens next."""
        what = {
            APPROVED: f"approved {self.proposed_action} (action {self.action_key}, delivered by "
            "the next run of the partition)",
            REJECTED: "rejected",
            SUPPRESSED: f"suppressed entity {self.entity_id} until "
            + (
                f"{self.suppressed_until:%Y-%m-%d %H:%M} UTC"
                if self.suppressed_until is not None
                else "?"
            ),
            RESOLVED: "resolved",
        }.get(self.status, self.status)
        return f"{self.key}: {what} by {self.decided_by} via {self.via}" + (
            f" ({self.note})" if self.note else ""
        )


@dataclass(frozen=True, slots=True)
class DueApprovedActions:
    """Approved proposed actions of one partition that a run should deliver now.

    Attributes:
        partition_key: The partition.
        count: How many.
        oldest: When the earliest of them was approved.
        newest: When the latest of them was approved.
    """

    partition_key: str
    count: int
    oldest: datetime
    newest: datetime


def aware(value: Any) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite returns it without its offset)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    stamp = pd.Timestamp(value)
    if pd.isna(stamp):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize(UTC)
    return stamp.to_pydatetime()


def check_decider(by: Any, *, approvers: Collection[str] | None = None) -> str:
    """The decider's name, checked: a real name, and one of ``approvers`` when they are listed.

    Raises:
        EscalationError: The name is missing, blank, too long, holds control characters, or is
            not among ``approvers``.
    """
    if not isinstance(by, str) or not by.strip():
        raise EscalationError("a decision needs the decider's name (--by); nothing was decided")
    name = by.strip()
    if len(name) > _MAX_DECIDER or _CONTROL_RE.search(name):
        raise EscalationError(
            f"the decider's name must be at most {_MAX_DECIDER} characters without control "
            f"characters, got {name[:40]!r}; nothing was decided"
        )
    if approvers is not None and name not in approvers:
        raise EscalationError(
            f"{name!r} may not decide these escalations (approvers: "
            f"{', '.join(sorted(approvers)) or 'nobody'}); nothing was decided"
        )
    return name


def check_via(via: Any) -> str:
    """``via`` checked against :data:`VIAS`.

    Raises:
        EscalationError: It is not one of them.
    """
    if via not in VIAS:
        raise EscalationError(f"via must be one of {list(VIAS)}, not {via!r}; nothing was decided")
    return str(via)


def check_note(note: Any, *, required: bool, what: str) -> str | None:
    """The note, stripped; None when empty and not required.

    Raises:
        EscalationError: A required note is missing or blank, or the note is not text.
    """
    if note is not None and not isinstance(note, str):
        raise EscalationError(f"the note must be text, got {type(note).__name__}")
    text = (note or "").strip()
    if required and not text:
        raise EscalationError(f"{what} needs a note saying why (--note); nothing was decided")
    return text or None


def check_keys(keys: Iterable[str]) -> list[str]:
    """The keys, without repeats, in order.

    Raises:
        EscalationError: No key is given, or a key is not text.
    """
    if isinstance(keys, str):
        keys = [keys]
    listed = list(keys)
    bad = [k for k in listed if not isinstance(k, str) or not k.strip()]
    if bad:
        raise EscalationError(f"escalation keys must be non-empty text, got {bad[:3]!r}")
    unique = list(dict.fromkeys(k.strip() for k in listed))
    if not unique:
        raise EscalationError("no escalation key given; nothing was decided")
    return unique


def _refuse(problems: Sequence[str], total: int) -> EscalationError:
    shown = problems[:_SHOWN_PROBLEMS]
    more = len(problems) - len(shown)
    return EscalationError(
        f"nothing decided ({len(problems)} of {total} escalation(s) refused): "
        + "; ".join(shown)
        + (f"; and {more} more" if more else "")
    )


def _not_open(key: str, row: Any) -> str:
    who = f" by {row.resolved_by}" if row.resolved_by else ""
    via = f" via {row.decided_via}" if row.decided_via else ""
    when = aware(row.resolved_at)
    at = f" at {when:%Y-%m-%d %H:%M} UTC" if when is not None else ""
    return f"{key}: not open (it is {row.status}{who}{via}{at})"


def entity_frame(raw: Sequence[Any]) -> pd.DataFrame:
    """The entity data of escalations (JSON text) as one DataFrame, a row per escalation."""
    rows: list[dict[str, Any]] = []
    for text in raw:
        try:
            data = json.loads(text) if isinstance(text, str) else dict(text or {})
        except (TypeError, ValueError):
            data = {}
        rows.append(data if isinstance(data, dict) else {})
    return pd.DataFrame(rows, index=range(len(rows)))


class Escalations(LedgerBase):
    """Open, dedupe, list and decide escalations."""

    def open_escalations(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert escalations that do not exist yet; returns the keys inserted by this call.

        Each row holds idempotency_key, playbook, playbook_version, insight, partition_key,
        entity_id, rule, kind, reason, data (a mapping, stored as JSON) and optionally
        dedupe_key (the case: a row whose case is already open is not inserted) and
        proposed_action (the action a person may approve).
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
                    decided_via="python",
                )
            )
            return bool(result.rowcount)

    # -- decisions ----------------------------------------------------------------------------

    def approve_escalations(
        self,
        keys: Iterable[str],
        *,
        by: str,
        note: str | None = None,
        via: str = "python",
        approvers: Collection[str] | None = None,
    ) -> list[EscalationDecision]:
        """Approve the proposed action of open escalations, in one transaction.

        Each escalation becomes ``approved`` and its proposed action is reserved in the outbox
        (state ``reserved``, decision ``approved``, keyed by :func:`approved_action_key`, with the
        escalation's entity data as its request), so the next delivery sends it once, through
        its channel, with the usual guarantees.

        Args:
            keys: Full escalation keys.
            by: Who approves (recorded).
            note: Why, or what was agreed (optional).
            via: How the decision was made: ``cli``, ``link`` or ``python``.
            approvers: When given, only these people may decide.

        Returns:
            What was decided, per key, in the order given.

        Raises:
            EscalationError: A key is unknown, an escalation is not open (a second approval, or
                one racing another decision), has no proposed action, or its entity is
                suppressed; or ``by``/``via`` is bad. Nothing is written.
        """
        return self._decide(
            keys,
            status=APPROVED,
            by=by,
            note=check_note(note, required=False, what="an approval"),
            via=via,
            approvers=approvers,
            what="approve escalations",
        )

    def reject_escalations(
        self,
        keys: Iterable[str],
        *,
        by: str,
        note: str,
        via: str = "python",
        approvers: Collection[str] | None = None,
    ) -> list[EscalationDecision]:
        """Reject open escalations (their proposed action, if any, is never executed).

        Args:
            keys: Full escalation keys.
            by: Who rejects (recorded).
            note: Why (required).
            via: ``cli``, ``link`` or ``python``.
            approvers: When given, only these people may decide.

        Returns:
            What was decided, per key, in the order given.

        Raises:
            EscalationError: The note is missing, a key is unknown or not open, or ``by``/``via``
                is bad. Nothing is written.
        """
        return self._decide(
            keys,
            status=REJECTED,
            by=by,
            note=check_note(note, required=True, what="a rejection"),
            via=via,
            approvers=approvers,
            what="reject escalations",
        )

    def resolve_escalations(
        self,
        keys: Iterable[str],
        *,
        by: str,
        note: str | None = None,
        via: str = "python",
        approvers: Collection[str] | None = None,
    ) -> list[EscalationDecision]:
        """Close open escalations with a note (a person handled them outside autoexec).

        Args:
            keys: Full escalation keys.
            by: Who resolved them (recorded).
            note: What was done (optional).
            via: ``cli``, ``link`` or ``python``.
            approvers: When given, only these people may decide.

        Returns:
            What was decided, per key, in the order given.

        Raises:
            EscalationError: A key is unknown or not open, or ``by``/``via`` is bad. Nothing is
                written.
        """
        return self._decide(
            keys,
            status=RESOLVED,
            by=by,
            note=check_note(note, required=False, what="a resolution"),
            via=via,
            approvers=approvers,
            what="resolve escalations",
        )

    def _decide(
        self,
        keys: Iterable[str],
        *,
        status: str,
        by: str,
        note: str | None,
        via: str,
        approvers: Collection[str] | None,
        what: str,
        suppress_for: timedelta | None = None,
        also: Callable[[sa.Connection, list[Any], datetime], None] | None = None,
    ) -> list[EscalationDecision]:
        """Decide open escalations in one transaction, all or nothing (see the module doc).

        ``also`` runs inside the same transaction with the decided rows and the decision's time.
        """
        wanted = check_keys(keys)
        name = check_decider(by, approvers=approvers)
        how = check_via(via)
        stamp = self.clock()
        t = schema.escalations
        with self._write(what) as conn:
            rows = self._lock_escalations(conn, wanted)
            problems = [
                f"{k}: no escalation has this key" if k not in rows else _not_open(k, rows[k])
                for k in wanted
                if k not in rows or rows[k].status != OPEN
            ]
            if status == APPROVED:
                problems += [
                    f"{k}: it proposes no action to approve (rule {rows[k].rule!r} sets none); "
                    "resolve or reject it instead"
                    for k in wanted
                    if k in rows and rows[k].status == OPEN and not rows[k].proposed_action
                ]
                problems += self._suppressed_problems(conn, wanted, rows, stamp)
            if problems:
                raise _refuse(problems, len(wanted))
            decided: list[str] = []
            for chunk in chunks(wanted):
                result = conn.execute(
                    sa.update(t)
                    .where(t.c.idempotency_key.in_(chunk), t.c.status == OPEN)
                    .values(
                        status=status,
                        resolved_at=stamp,
                        resolved_by=name,
                        resolution=note,
                        decided_via=how,
                    )
                    .returning(t.c.idempotency_key)
                )
                decided.extend(r[0] for r in result)
            if len(decided) != len(wanted):
                # Locked above, so only a ledger without row locks gets here; refuse rather than
                # decide part of what the person confirmed.
                late = sorted(set(wanted) - set(decided))
                raise _refuse(
                    [f"{k}: decided by someone else at the same moment" for k in late], len(wanted)
                )
            until = stamp + suppress_for if suppress_for is not None else None
            if status == APPROVED:
                self._reserve_approved(
                    conn, [rows[k] for k in wanted], by=name, via=how, stamp=stamp
                )
            if also is not None:
                # The caller's part of the same decision (a suppression's record), atomically.
                also(conn, [rows[k] for k in wanted], stamp)
        return [
            EscalationDecision(
                key=k,
                status=status,
                playbook=rows[k].playbook,
                partition_key=rows[k].partition_key,
                entity_id=rows[k].entity_id,
                decided_by=name,
                decided_at=stamp,
                via=how,
                note=note,
                proposed_action=rows[k].proposed_action,
                action_key=approved_action_key(k) if status == APPROVED else None,
                suppressed_until=until if status == SUPPRESSED else None,
            )
            for k in wanted
        ]

    def _lock_escalations(self, conn: sa.Connection, keys: Sequence[str]) -> dict[str, Any]:
        """The escalations' rows, locked for this transaction (SQLite's BEGIN IMMEDIATE already
        holds the write lock; on PostgreSQL two deciders must see each other's decision)."""
        t = schema.escalations
        rows: dict[str, Any] = {}
        for chunk in chunks(keys):
            query = sa.select(t).where(t.c.idempotency_key.in_(chunk))
            if self.dialect == "postgresql":
                query = query.with_for_update()
            rows.update({r.idempotency_key: r for r in conn.execute(query)})
        return rows

    def _suppressed_problems(
        self, conn: sa.Connection, keys: Sequence[str], rows: Mapping[str, Any], at: datetime
    ) -> list[str]:
        """Approvals of entities that are suppressed now: the later 'no action' decision wins."""
        s = schema.suppressions
        by_playbook: dict[str, list[str]] = {}
        for k in keys:
            if k in rows:
                by_playbook.setdefault(rows[k].playbook, []).append(rows[k].entity_id)
        active: dict[tuple[str, str], Any] = {}
        for playbook, entities in by_playbook.items():
            for chunk in chunks(list(dict.fromkeys(entities))):
                for row in conn.execute(
                    sa.select(s).where(
                        s.c.playbook == playbook, s.c.entity_id.in_(chunk), s.c.until > at
                    )
                ):
                    active[(row.playbook, row.entity_id)] = row
        problems = []
        for k in keys:
            row = rows.get(k)
            if row is None:
                continue
            hit = active.get((row.playbook, row.entity_id))
            if hit is not None:
                until = aware(hit.until)
                problems.append(
                    f"{k}: entity {row.entity_id} is suppressed by {hit.suppressed_by} until "
                    f"{until:%Y-%m-%d %H:%M} UTC; no action may be approved for it before then"
                )
        return problems

    def _reserve_approved(
        self, conn: sa.Connection, rows: Sequence[Any], *, by: str, via: str, stamp: datetime
    ) -> None:
        """Reserve the outbox row of each approved proposal, in the deciding transaction."""
        values = []
        for row in rows:
            try:
                data = json.loads(row.data) if row.data else {}
            except ValueError:
                data = {}
            values.append(
                {
                    "idempotency_key": approved_action_key(row.idempotency_key),
                    "playbook": row.playbook,
                    "playbook_version": row.playbook_version,
                    "insight": row.insight,
                    "partition_key": row.partition_key,
                    "entity_id": row.entity_id,
                    "rule": row.rule,
                    "action": row.proposed_action,
                    "decision": APPROVED_DECISION,
                    "state": RESERVED,
                    # The channel's mode is set by the delivery, which knows the channel.
                    "delivery": "at_least_once",
                    "detail": f"approved by {by} via {via} (escalation {row.idempotency_key})"[
                        :500
                    ],
                    "payload": payload.dumps(data if isinstance(data, dict) else {}),
                    "created_at": stamp,
                    "updated_at": stamp,
                }
            )
        for chunk in chunks(values):
            conn.execute(self._insert_ignore(schema.actions), list(chunk))

    # -- the queue, for people ------------------------------------------------------------------

    def select_escalations(
        self,
        *,
        playbook: str,
        partition_key: str | None = None,
        rule: str | None = None,
        where: str | None = None,
        statuses: Iterable[str] | None = (OPEN,),
        keys: Sequence[str] | None = None,
        sort: str | None = None,
        descending: bool = False,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Escalations of a playbook, filtered and sorted, as the command line lists and picks them.

        Args:
            playbook: The playbook.
            partition_key: Only this partition.
            rule: Only escalations by this rule.
            where: A pandas query expression over the escalations' entity data (the grammar
                rules use, e.g. ``"lifetime_value >= 8000 and plan == 'premium'"``).
            statuses: Only these statuses (None: every status).
            keys: Only these keys.
            sort: A ledger column (:data:`SORT_COLUMNS`) or a column of the entity data.
            descending: Sort largest first.
            limit: At most this many rows, after filtering and sorting.

        Returns:
            The escalation rows (ledger columns), oldest first unless sorted.

        Raises:
            EscalationError: The filter does not parse, reads a column no selected escalation's
                data has, or fails to evaluate; a status is unknown; the sort column is neither
                a ledger column nor a column of the selected escalations' data.
        """
        parsed = None
        if where is not None:
            try:
                parsed = parse_expression(where, rule="filter")
            except PlaybookError as exc:
                reason = str(exc).removeprefix("rule 'filter': ")
                raise EscalationError(f"the filter cannot be used: {reason}") from None
        wanted = None if statuses is None else list(statuses)
        unknown = sorted(set(wanted or ()) - set(ESCALATION_STATUSES))
        if unknown:
            raise EscalationError(
                f"unknown escalation status(es) {unknown}; statuses are {list(ESCALATION_STATUSES)}"
            )
        t = schema.escalations
        query = sa.select(t).where(t.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        if rule is not None:
            query = query.where(t.c.rule == rule)
        if wanted is not None:
            query = query.where(t.c.status.in_(wanted))
        if keys is not None:
            query = query.where(t.c.idempotency_key.in_(list(keys)))
        in_sql = parsed is None and (sort is None or sort in SORT_COLUMNS)
        if in_sql:
            column = t.c[SORT_COLUMNS[sort]] if sort is not None else t.c.created_at
            order = column.desc() if descending else column.asc()
            query = query.order_by(order, t.c.created_at, t.c.idempotency_key)
            if limit is not None:
                query = query.limit(limit)
        else:
            query = query.order_by(t.c.created_at, t.c.idempotency_key)
        with self._read("list escalations") as conn:
            frame = pd.read_sql(query, conn)
        if in_sql or frame.empty:
            return frame.reset_index(drop=True)
        data = entity_frame(frame["data"].tolist())
        if parsed is not None and where is not None:
            absent = sorted(parsed.columns - set(data.columns))
            if absent:
                raise EscalationError(
                    f"the filter {where!r} reads column(s) {', '.join(map(repr, absent))}, which "
                    f"the selected escalations' data does not hold; it holds "
                    f"{', '.join(map(str, data.columns)) or 'nothing'}"
                )
            try:
                result = data.eval(where, engine="python")
            except Exception as exc:  # the person's expression over data of any type
                raise EscalationError(
                    f"the filter {where!r} failed to evaluate: {type(exc).__name__}: {exc}"
                ) from None
            if isinstance(result, pd.Series):
                mask = result.fillna(False).astype(bool).to_numpy()
            else:
                mask = [bool(result)] * len(frame)
            frame = frame[mask].reset_index(drop=True)
            data = data[mask].reset_index(drop=True)
        if sort is not None:
            frame = sort_escalations(frame, data, sort=sort, descending=descending)
        if limit is not None:
            frame = frame.head(limit)
        return frame.reset_index(drop=True)

    def approved_action_states(self, escalation_keys: Sequence[str]) -> dict[str, str]:
        """The outbox state of each approved escalation's action (reserved, succeeded, ...)."""
        by_action = {approved_action_key(k): k for k in escalation_keys}
        t = schema.actions
        found: dict[str, str] = {}
        with self._read("read approved actions") as conn:
            for chunk in chunks(list(by_action)):
                for key, state in conn.execute(
                    sa.select(t.c.idempotency_key, t.c.state).where(t.c.idempotency_key.in_(chunk))
                ):
                    found[by_action[key]] = state
        return found

    def match_escalation_keys(
        self, prefixes: Sequence[str], *, playbook: str | None = None
    ) -> dict[str, list[str]]:
        """Full keys of the escalations (any status) each prefix names (at most 6 per prefix)."""
        t = schema.escalations
        found: dict[str, list[str]] = {}
        with self._read("find escalation keys") as conn:
            for prefix in dict.fromkeys(prefixes):
                # Keys are hex (or dry:hex); anything else, LIKE's wildcards included, names none.
                if not re.fullmatch(r"[0-9A-Za-z:-]+", prefix):
                    found[prefix] = []
                    continue
                query = (
                    sa.select(t.c.idempotency_key)
                    .where(t.c.idempotency_key.like(f"{prefix}%"))
                    .order_by(t.c.idempotency_key)
                    .limit(6)
                )
                if playbook is not None:
                    query = query.where(t.c.playbook == playbook)
                found[prefix] = [str(k) for k in conn.execute(query).scalars()]
        return found

    # -- approved actions in the outbox -------------------------------------------------------

    def approved_actions_pending(
        self, *, playbook: str, partition_key: str | None = None
    ) -> dict[str, list[str]]:
        """Approved proposed actions not delivered yet (reserved, sending or in doubt), per action.

        Args:
            playbook: The playbook.
            partition_key: Only this partition (None: every partition).
        """
        t = schema.actions
        query = sa.select(t.c.action, t.c.idempotency_key).where(
            t.c.playbook == playbook,
            t.c.decision == APPROVED_DECISION,
            t.c.state.in_(list(_PENDING_OUTBOX)),
        )
        if partition_key is not None:
            query = query.where(t.c.partition_key == partition_key)
        found: dict[str, list[str]] = {}
        with self._read("list approved actions to deliver") as conn:
            for action, key in conn.execute(query.order_by(t.c.created_at, t.c.idempotency_key)):
                found.setdefault(str(action), []).append(str(key))
        return found

    def escalation_actions_due(self, *, playbook: str) -> list[tuple[str, int]]:
        """Partitions holding approved proposed actions that a run should deliver now.

        Due: reserved, in doubt, or left in ``sending`` by a worker whose lease ran out. Actions
        a live worker is sending are not due (its run delivers them). One aggregate query over
        the outbox's state index, for a sensor tick.

        Returns:
            ``(partition_key, count)`` per partition with due work, sorted by partition.
        """
        return [
            (b.partition_key, b.count) for b in self.escalation_action_batches(playbook=playbook)
        ]

    def escalation_action_batches(self, *, playbook: str) -> list["DueApprovedActions"]:
        """What :meth:`escalation_actions_due` counts, with the oldest and newest approval of
        each partition's due batch (for a sensor's run key: a new approval makes a new batch)."""
        t = schema.actions
        due = sa.or_(
            t.c.state.in_([RESERVED, IN_DOUBT]),
            sa.and_(t.c.state == SENDING, t.c.lease_expires_at < time.time()),
        )
        query = (
            sa.select(
                t.c.partition_key,
                sa.func.count(),
                sa.func.min(t.c.created_at),
                sa.func.max(t.c.created_at),
            )
            .where(
                t.c.state.in_(list(_PENDING_OUTBOX)),
                t.c.playbook == playbook,
                t.c.decision == APPROVED_DECISION,
                due,
            )
            .group_by(t.c.partition_key)
            .order_by(t.c.partition_key)
        )
        with self._read("list partitions with approved actions due") as conn:
            rows = conn.execute(query).all()
        batches = []
        for partition, n, oldest, newest in rows:
            first, last = aware(oldest), aware(newest)
            assert first is not None and last is not None
            batches.append(
                DueApprovedActions(
                    partition_key=str(partition), count=int(n), oldest=first, newest=last
                )
            )
        return batches

    def approved_action_rows(
        self, keys: Sequence[str], *, states: Iterable[str] = (RESERVED,)
    ) -> dict[str, dict[str, Any]]:
        """Approved actions as the delivery checks them: where they come from and the request
        data (``data``, with ``entity_id``), by key, for rows in ``states``."""
        t = schema.actions
        found: dict[str, dict[str, Any]] = {}
        with self._read("read approved actions") as conn:
            for chunk in chunks(keys):
                for row in conn.execute(
                    sa.select(
                        t.c.idempotency_key,
                        t.c.playbook,
                        t.c.playbook_version,
                        t.c.insight,
                        t.c.partition_key,
                        t.c.entity_id,
                        t.c.rule,
                        t.c.action,
                        t.c.payload,
                    ).where(t.c.idempotency_key.in_(chunk), t.c.state.in_(list(states)))
                ):
                    found[str(row.idempotency_key)] = {
                        "playbook": row.playbook,
                        "playbook_version": row.playbook_version,
                        "insight": row.insight,
                        "partition_key": row.partition_key,
                        "entity_id": row.entity_id,
                        "rule": row.rule,
                        "action": row.action,
                        "data": {**payload.loads(row.payload), "entity_id": row.entity_id},
                    }
        return found

    def set_delivery_mode(self, keys: Sequence[str], *, delivery: str) -> int:
        """Record the channel's delivery mode on reserved rows (nothing was sent for them yet)."""
        t = schema.actions
        changed = 0
        with self._write("set the delivery mode") as conn:
            for chunk in chunks(keys):
                result = conn.execute(
                    sa.update(t)
                    .where(
                        t.c.idempotency_key.in_(chunk),
                        t.c.state == RESERVED,
                        t.c.delivery != delivery,
                    )
                    .values(delivery=delivery)
                )
                changed += result.rowcount or 0
        return changed


def sort_escalations(
    frame: pd.DataFrame, data: pd.DataFrame, *, sort: str, descending: bool
) -> pd.DataFrame:
    """Escalation rows sorted by a ledger column or an entity data column (missing values last).

    Raises:
        EscalationError: ``sort`` is neither a ledger column nor a column of ``data``.
    """
    if sort in SORT_COLUMNS:
        values = frame[SORT_COLUMNS[sort]]
    elif sort in data.columns:
        values = data[sort]
    else:
        raise EscalationError(
            f"cannot sort by {sort!r}: it is neither a ledger column ("
            f"{', '.join(sorted(SORT_COLUMNS))}) nor a column of the escalations' data ("
            f"{', '.join(map(str, data.columns)) or 'none'})"
        )
    numeric = pd.to_numeric(values, errors="coerce")
    # Mixed or textual columns sort as text; numbers as numbers.
    if numeric.notna().sum() == values.notna().sum():
        key = numeric
    else:
        key = values.astype(str).where(values.notna())
    order = (
        pd.DataFrame({"k": key.to_numpy(), "i": range(len(frame))})
        .sort_values("k", ascending=not descending, na_position="last", kind="stable")["i"]
        .to_numpy()
    )
    return frame.iloc[order].reset_index(drop=True)
