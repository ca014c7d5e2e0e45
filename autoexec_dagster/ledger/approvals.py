"""Approval requests of workflow approval gates, and each approver's decision.

A request binds to the digest of the payload it approves (what the following steps will do). A
decision names the request, the person, how they decided (``cli``, ``link``, ``python``) and,
optionally, the digest they saw: a decision on a changed payload, by someone not listed, after the
expiry, or a second one by the same person is refused and nothing is written. Each approver
decides once (the decisions table's key), ``min_approvals`` distinct approvals approve a request,
and one rejection rejects it. A request that becomes decided wakes its instance (``next_due`` is
set to now), so the sensor asks for a run of its partition; the advance that moves the instance on
marks the decision applied in the same transaction that saves the instance.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pandas as pd
import sqlalchemy as sa

from autoexec_dagster.errors import ApprovalError
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.engine import LedgerBase, chunks
from autoexec_dagster.ledger.schema import (
    ACTIVE_INSTANCE_STATES,
    APPROVED,
    PENDING,
    REJECTED,
)

Decision = Literal["approve", "reject"]
VIAS: tuple[str, ...] = ("cli", "link", "python")
# Columns of a listing; the payload is left out unless asked for (it is the largest).
LISTING_COLUMNS: tuple[str, ...] = (
    "approval_id",
    "playbook",
    "partition_key",
    "entity_id",
    "workflow",
    "step",
    "status",
    "value",
    "approvers",
    "min_approvals",
    "requested_at",
    "expires_at",
    "sla_due_at",
    "decided_at",
    "decided_by",
    "decided_via",
    "decision_note",
    "instance_id",
    "digest",
)
_SHOWN_ERRORS = 10
_TIME_COLUMNS: tuple[str, ...] = ("requested_at", "expires_at", "sla_due_at", "decided_at")


@dataclass(frozen=True)
class DecisionResult:
    """What one decision did to one request.

    Attributes:
        approval_id: The request.
        status: Its status after the decision (``pending`` while more approvals are needed).
        approvals: Distinct approvals it has now.
        needed: Distinct approvals it needs.
        entity_id: The entity the request is for.
        value: The request's value (None when it has none).
    """

    approval_id: str
    status: str
    approvals: int
    needed: int
    entity_id: str
    value: float | None


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class ApprovalStore(LedgerBase):
    """Request, decide, list and close approval requests."""

    def request_approvals(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """Insert approval requests that do not exist yet; returns the ids inserted by this call.

        Each row holds every non-null column of ``autoexec_approvals`` except ``status`` (pending
        unless given: a gate its rule passed is recorded approved, with its decision columns);
        ``approvers`` is a list and ``payload`` a mapping (both stored as JSON).
        """
        if not rows:
            return []
        t = schema.approvals
        statement = self._insert_ignore(t).returning(t.c.approval_id)
        inserted: list[str] = []
        with self._write("request approvals") as conn:
            for chunk in chunks(rows, 2_000):
                values = [
                    {
                        "status": PENDING,
                        **row,
                        "approvers": json.dumps(list(row["approvers"])),
                        "payload": json.dumps(row["payload"], sort_keys=True, default=str),
                    }
                    for row in chunk
                ]
                inserted.extend(r[0] for r in conn.execute(statement, values))
        return inserted

    def approval_rows(self, approval_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each existing request as a dict (``approvers`` and ``payload`` decoded)."""
        t = schema.approvals
        found: dict[str, dict[str, Any]] = {}
        with self._read("read approval requests") as conn:
            for chunk in chunks(list(approval_ids)):
                for row in conn.execute(sa.select(t).where(t.c.approval_id.in_(chunk))).mappings():
                    found[row["approval_id"]] = _decoded(row)
        return found

    def approve(
        self,
        approval_ids: Sequence[str],
        *,
        by: str,
        note: str | None = None,
        via: str = "python",
        digest: str | None = None,
    ) -> list[DecisionResult]:
        """Approve pending requests as ``by``; all or nothing.

        Args:
            approval_ids: The requests (full ids).
            by: The approver's name, as listed in the step's ``approvers``.
            note: Why, for the record.
            via: How the decision was made: ``cli``, ``link`` or ``python``.
            digest: The payload digest the approver saw (signed links carry it); a request
                whose payload has changed since is refused.

        Returns:
            One :class:`DecisionResult` per request, in the order given.

        Raises:
            ApprovalError: A request is unknown, no longer pending, expired, was already decided
                by ``by``, ``by`` is not one of its approvers, or the digest differs. Nothing is
                written.
        """
        return self.decide(
            approval_ids, decision="approve", by=by, note=note, via=via, digest=digest
        )

    def reject(
        self,
        approval_ids: Sequence[str],
        *,
        by: str,
        note: str,
        via: str = "python",
        digest: str | None = None,
    ) -> list[DecisionResult]:
        """Reject pending requests as ``by`` (a note is required); all or nothing.

        Raises:
            ApprovalError: As :meth:`approve`, or the note is empty.
        """
        if not (note or "").strip():
            raise ApprovalError("a rejection needs a note (why), for the record and the requester")
        return self.decide(
            approval_ids, decision="reject", by=by, note=note, via=via, digest=digest
        )

    def decide(
        self,
        approval_ids: Sequence[str],
        *,
        decision: Decision,
        by: str,
        note: str | None,
        via: str,
        digest: str | None = None,
    ) -> list[DecisionResult]:
        """Record ``by``'s decision on each request, in one transaction; see :meth:`approve`."""
        by = (by or "").strip()
        if not by:
            raise ApprovalError("a decision needs the decider's name (--by)")
        if via not in VIAS:
            raise ApprovalError(f"via must be one of {list(VIAS)}, not {via!r}")
        if decision not in ("approve", "reject"):
            raise ApprovalError(f"a decision is 'approve' or 'reject', not {decision!r}")
        ids = list(dict.fromkeys(approval_ids))
        if not ids:
            raise ApprovalError("no approval request given")
        a, d, w = schema.approvals, schema.approval_decisions, schema.workflow_instances
        moment = self.clock()
        results: list[DecisionResult] = []
        with self._write("record approval decisions") as conn:
            rows: dict[str, Any] = {}
            for chunk in chunks(ids):
                query = sa.select(
                    a.c.approval_id,
                    a.c.status,
                    a.c.approvers,
                    a.c.min_approvals,
                    a.c.digest,
                    a.c.expires_at,
                    a.c.instance_id,
                    a.c.entity_id,
                    a.c.value,
                    a.c.decided_by,
                ).where(a.c.approval_id.in_(chunk))
                if self.dialect == "postgresql":
                    # Two approvers deciding at once must see each other's decision.
                    query = query.with_for_update()
                rows.update({r.approval_id: r for r in conn.execute(query)})
            earlier: dict[str, dict[str, str]] = {i: {} for i in ids}
            for chunk in chunks(ids):
                for approval_id, approver, made in conn.execute(
                    sa.select(d.c.approval_id, d.c.approver, d.c.decision).where(
                        d.c.approval_id.in_(chunk)
                    )
                ):
                    earlier[approval_id][approver] = made
            problems = _problems(ids, rows, earlier, by=by, digest=digest, now=moment)
            if problems:
                shown = problems[:_SHOWN_ERRORS]
                more = len(problems) - len(shown)
                raise ApprovalError(
                    f"nothing decided ({len(problems)} of {len(ids)} request(s) refused): "
                    + "; ".join(shown)
                    + (f"; and {more} more" if more else "")
                )
            conn.execute(
                sa.insert(d),
                [
                    {
                        "approval_id": i,
                        "approver": by,
                        "decision": decision,
                        "digest": rows[i].digest,
                        "note": note,
                        "via": via,
                        "decided_at": moment,
                    }
                    for i in ids
                ],
            )
            closes: list[dict[str, Any]] = []
            for approval_id in ids:
                row = rows[approval_id]
                approvers = [p for p, m in earlier[approval_id].items() if m == "approve"]
                status = PENDING
                if decision == "reject":
                    status = REJECTED
                else:
                    approvers.append(by)
                    if len(approvers) >= row.min_approvals:
                        status = APPROVED
                if status != PENDING:
                    deciders = [by] if status == REJECTED else approvers
                    closes.append(
                        {
                            "b_id": approval_id,
                            "b_status": status,
                            "b_by": ", ".join(deciders),
                            "b_via": via,
                            "b_note": note,
                        }
                    )
                results.append(
                    DecisionResult(
                        approval_id=approval_id,
                        status=status,
                        approvals=len(approvers),
                        needed=int(row.min_approvals),
                        entity_id=str(row.entity_id),
                        value=None if row.value is None else float(row.value),
                    )
                )
            if closes:
                conn.execute(
                    sa.update(a)
                    .where(a.c.approval_id == sa.bindparam("b_id"), a.c.status == PENDING)
                    .values(
                        status=sa.bindparam("b_status"),
                        decided_at=moment,
                        decided_by=sa.bindparam("b_by"),
                        decided_via=sa.bindparam("b_via"),
                        decision_note=sa.bindparam("b_note"),
                    ),
                    closes,
                )
                woken = sorted({rows[c["b_id"]].instance_id for c in closes})
                for chunk in chunks(woken):
                    # Due now: the sensor's one query on next_due finds the partition.
                    conn.execute(
                        sa.update(w)
                        .where(w.c.instance_id.in_(chunk), w.c.state.in_(ACTIVE_INSTANCE_STATES))
                        .values(next_due=moment)
                    )
        return results

    def close_approvals(
        self,
        approval_ids: Sequence[str],
        *,
        status: str,
        by: str,
        note: str,
        from_status: Sequence[str] = (PENDING,),
        applied: bool = True,
    ) -> list[str]:
        """Close requests still in ``from_status`` (expiry, a changed payload); returns the ids
        closed by this call, so a decision that landed first wins and is not overwritten."""
        if not approval_ids:
            return []
        a = schema.approvals
        moment = self.clock()
        closed: list[str] = []
        with self._write(f"close approval requests as {status}") as conn:
            for chunk in chunks(list(approval_ids)):
                result = conn.execute(
                    sa.update(a)
                    .where(a.c.approval_id.in_(chunk), a.c.status.in_(list(from_status)))
                    .values(
                        status=status,
                        decided_at=moment,
                        decided_by=by,
                        decided_via="expiry" if status == schema.EXPIRED else "autoexec",
                        decision_note=note,
                        applied_at=moment if applied else None,
                    )
                    .returning(a.c.approval_id)
                )
                closed.extend(r[0] for r in result)
        return closed

    def decided_unapplied(self, instance_ids: Sequence[str]) -> set[str]:
        """Instances with a decided request the workflow has not applied yet."""
        a = schema.approvals
        found: set[str] = set()
        with self._read("look for decided approvals") as conn:
            for chunk in chunks(list(instance_ids)):
                found.update(
                    conn.execute(
                        sa.select(a.c.instance_id).where(
                            a.c.instance_id.in_(chunk),
                            a.c.applied_at.is_(None),
                            a.c.status.in_([APPROVED, REJECTED]),
                        )
                    ).scalars()
                )
        return found

    def approvals(
        self,
        *,
        playbook: str | None = None,
        partition_key: str | None = None,
        status: str | Sequence[str] | None = None,
        approval_ids: Sequence[str] | None = None,
        with_payload: bool = False,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Approval requests, oldest first (``approvers`` as JSON text; ``payload`` if asked).

        Args:
            playbook: Only this playbook.
            partition_key: Only this partition.
            status: Only these statuses (``pending``, ``approved``, ``rejected``, ``expired``,
                ``void``); None for all.
            approval_ids: Only these requests.
            with_payload: Include the payload column (JSON text).
            limit: At most this many rows.
        """
        a = schema.approvals
        names = [*LISTING_COLUMNS, "payload"] if with_payload else list(LISTING_COLUMNS)
        # Times come back as the driver gives them (ISO text on SQLite) and are parsed by pandas
        # in one vectorised pass: SQLAlchemy's per-row datetime processing cost more than the
        # query itself at 100,000 rows.
        selected = [
            sa.type_coerce(a.c[n], sa.Text).label(n) if n in _TIME_COLUMNS else a.c[n]
            for n in names
        ]
        query = sa.select(*selected).order_by(a.c.requested_at, a.c.approval_id)
        if playbook is not None:
            query = query.where(a.c.playbook == playbook)
        if partition_key is not None:
            query = query.where(a.c.partition_key == partition_key)
        if isinstance(status, str):
            query = query.where(a.c.status == status)
        elif status is not None:
            query = query.where(a.c.status.in_(list(status)))
        if approval_ids is not None:
            query = query.where(a.c.approval_id.in_(list(approval_ids)))
        if limit is not None:
            query = query.limit(limit)
        with self._read("list approval requests") as conn:
            rows = _driver_rows(conn, query)
        frame = pd.DataFrame(rows, columns=names)
        for column in _TIME_COLUMNS:
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
        return frame

    def pending_approvals(
        self,
        *,
        playbook: str | None = None,
        partition_key: str | None = None,
        with_payload: bool = False,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Requests waiting for people, oldest first; see :meth:`approvals`."""
        return self.approvals(
            playbook=playbook,
            partition_key=partition_key,
            status=PENDING,
            with_payload=with_payload,
            limit=limit,
        )

    def approval_decisions(self, approval_ids: Sequence[str]) -> pd.DataFrame:
        """Every approver's decision on these requests, oldest first."""
        d = schema.approval_decisions
        frames = []
        with self._read("read approval decisions") as conn:
            for chunk in chunks(list(approval_ids)):
                result = conn.execute(
                    sa.select(d).where(d.c.approval_id.in_(chunk)).order_by(d.c.decided_at)
                )
                frames.append(pd.DataFrame(result.fetchall(), columns=list(result.keys())))
        if not frames:
            return pd.DataFrame(columns=[c.name for c in d.c])
        return pd.concat(frames, ignore_index=True)

    def approval_counts(
        self, *, playbook: str, partition_key: str | None = None
    ) -> list[dict[str, Any]]:
        """Per partition and status: requests, total value, oldest request and latest decision."""
        a = schema.approvals
        query = (
            sa.select(
                a.c.partition_key,
                a.c.status,
                sa.func.count(),
                sa.func.sum(a.c.value),
                sa.func.min(a.c.requested_at),
                sa.func.max(a.c.decided_at),
                sa.func.min(a.c.sla_due_at),
            )
            .where(a.c.playbook == playbook)
            .group_by(a.c.partition_key, a.c.status)
            .order_by(a.c.partition_key, a.c.status)
        )
        if partition_key is not None:
            query = query.where(a.c.partition_key == partition_key)
        with self._read("count approval requests") as conn:
            return [
                {
                    "partition_key": str(p),
                    "status": str(s),
                    "count": int(n),
                    "value": float(v or 0.0),
                    "oldest_requested_at": _aware(oldest),
                    "last_decided_at": _aware(last),
                    "earliest_sla_due_at": _aware(sla),
                }
                for p, s, n, v, oldest, last, sla in conn.execute(query)
            ]


def _driver_rows(conn: sa.Connection, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    """The query's rows as the driver returns them (plain tuples).

    A listing of 100,000 requests spent more time building SQLAlchemy rows (and pandas probing
    each of them) than the database spent reading them; the query is still built and bound by
    SQLAlchemy, only the rows skip its result layer.
    """
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    if compiled.positional:
        bound: Any = [params[name] for name in compiled.positiontup or ()]
    else:
        bound = params
    cursor = conn.connection.cursor()
    try:
        cursor.execute(str(compiled), bound)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _decoded(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["approvers"] = json.loads(out["approvers"])
    out["payload"] = json.loads(out["payload"])
    for column in ("requested_at", "expires_at", "sla_due_at", "decided_at", "applied_at"):
        out[column] = _aware(out.get(column))
    return out


def _problems(
    ids: Sequence[str],
    rows: Mapping[str, Any],
    earlier: Mapping[str, Mapping[str, str]],
    *,
    by: str,
    digest: str | None,
    now: datetime,
) -> list[str]:
    problems: list[str] = []
    for approval_id in ids:
        row = rows.get(approval_id)
        if row is None:
            problems.append(f"{approval_id}: no such approval request")
            continue
        if row.status != PENDING:
            who = f" by {row.decided_by}" if row.decided_by else ""
            problems.append(f"{approval_id}: not pending (it is {row.status}{who})")
            continue
        approvers = json.loads(row.approvers)
        if by not in approvers:
            problems.append(
                f"{approval_id}: {by!r} is not an approver of this request (approvers: "
                f"{', '.join(approvers)})"
            )
            continue
        if by in earlier.get(approval_id, {}):
            problems.append(
                f"{approval_id}: {by} already decided ({earlier[approval_id][by]}); each "
                "approver decides once"
            )
            continue
        expires = _aware(row.expires_at)
        if expires is not None and expires <= now:
            problems.append(
                f"{approval_id}: expired at {expires:%Y-%m-%d %H:%M} UTC; its on_expiry applies"
            )
            continue
        if digest is not None and digest != row.digest:
            problems.append(
                f"{approval_id}: the payload changed since this decision was offered (digest "
                f"{digest[:12]}... is not the request's {row.digest[:12]}...); a changed payload "
                "needs a new approval"
            )
    return problems
