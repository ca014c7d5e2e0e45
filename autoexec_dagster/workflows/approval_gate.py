"""Approval gates: where ``approve_when`` holds, an instance waits for people; elsewhere it passes.

A gate opens one request per instance in the ledger, bound to the digest of the payload the
following steps will act on, notifies each approver (with signed approve and reject links when
they are configured) through the notify channel, and parks the instance until the request's
expiry. A decision sets the instance due at once, so the sensor requests a run; that run applies
the decision here (approved: the next step; rejected: the instance ends rejected), marking it
applied in the same transaction that saves the instance. Past the expiry, ``on_expiry`` applies,
and the expiry is written guarded on the request still being pending, so a decision that arrives
at the same moment either wins or is refused, never both. If the payload has changed by the time
a decision is applied, the request is void and a new one is opened: nobody approved this payload.
"""

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.channels.base import digest
from autoexec_dagster.keys import approval_key, notify_keys
from autoexec_dagster.ledger import payload
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import (
    APPROVED,
    EXPIRED,
    PENDING,
    REJECTED,
    RESERVED,
    SENDING,
    SUCCEEDED,
    VOID,
)
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.workflows.durations import format_duration
from autoexec_dagster.workflows.instance import Instance
from autoexec_dagster.workflows.report import WorkflowReport
from autoexec_dagster.workflows.workflow import Step

RULE = "rule"


class GateHost(Protocol):
    """What a gate needs from the advance that runs it."""

    ledger: ActionLedger
    playbook: Playbook
    report: WorkflowReport
    run_id: str | None
    links: ApprovalLinks | None
    applied_approvals: list[str]

    def _evaluate(
        self, step: Step, field_name: str, members: list[Instance]
    ) -> tuple[list[Instance], list[Instance]]: ...

    def _fail(self, instance: Instance, step: Step, error: str, now: datetime) -> None: ...

    def _next_step(self, instance: Instance, now: datetime) -> None: ...

    def _wait(self, instance: Instance, due: datetime, *, state: str = ...) -> None: ...

    def _log(
        self, instance: Instance, step: Step, outcome: str, detail: str, now: datetime
    ) -> None: ...

    def _reject(self, instance: Instance, step: Step, detail: str, now: datetime) -> None: ...


def column_value(instance: Instance, column: str) -> Any:
    """An insight column or an earlier output (``<step>.<field>``) of one instance."""
    if column in instance.data:
        return instance.data[column]
    step_name, dot, name = column.partition(".")
    output = instance.outputs.get(step_name) if dot else None
    return output.get(name) if isinstance(output, Mapping) else None


def approval_payload(step: Step, instance: Instance) -> dict[str, Any]:
    """What the request approves: the ``approves`` columns, or the entity and earlier outputs."""
    if step.approves is not None:
        return {column: column_value(instance, column) for column in step.approves}
    steps = {name: out for name, out in instance.outputs.items() if name != step.name}
    return {"entity": dict(instance.data), "steps": steps}


def _next_look(request: Mapping[str, Any], now: datetime) -> datetime:
    """When a waiting instance is due again: at its SLA (a run then evaluates the SLA check),
    else at its expiry. A decision makes it due at once either way."""
    sla = request.get("sla_due_at")
    if sla is not None and sla > now:
        return min(sla, request["expires_at"])
    return request["expires_at"]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None


class ApprovalGate:
    """Moves the instances at one approval step; see the module docstring."""

    def __init__(
        self,
        host: GateHost,
        *,
        send_notifications: Callable[[list[dict[str, Any]]], Awaitable[tuple[int, int]]],
    ):
        self.host = host
        self._send = send_notifications

    async def advance(self, step: Step, members: list[Instance], now: datetime) -> None:
        """Open, apply or expire the requests of the instances at ``step``."""
        fresh = [i for i in members if i.step_started_at is None]
        waiting = [i for i in members if i.step_started_at is not None]
        opened: list[tuple[Instance, dict[str, Any]]] = []
        if fresh:
            opened.extend(await self._open(step, fresh, now))
        if waiting:
            opened.extend(await self._apply(step, waiting, now))
        if opened:
            await self._notify(step, opened)

    # -- opening ------------------------------------------------------------------------------

    async def _open(
        self, step: Step, fresh: list[Instance], now: datetime
    ) -> list[tuple[Instance, dict[str, Any]]]:
        host = self.host
        needs, passes = host._evaluate(step, "approve_when", fresh)
        rule_rows = []
        for instance in passes:
            row = self._request_row(step, instance, now)
            row.update(
                status=APPROVED,
                decided_at=now,
                decided_by=RULE,
                decided_via=RULE,
                decision_note=f"{step.approve_when} does not hold",
                applied_at=now,
            )
            rule_rows.append(row)
            instance.outputs[step.name] = {
                "status": APPROVED,
                "by": RULE,
                "via": RULE,
                "approval_id": row["approval_id"],
            }
            host._log(
                instance, step, SUCCEEDED, f"approved by the rule ({row['decision_note']})", now
            )
            host.report.approved_by_rule += 1
            host.report.count(step.name, "approved_by_rule")
            host._next_step(instance, now)
        if rule_rows:
            # Recorded as requests the rule approved: "value approved automatically" is a sum.
            host.ledger.request_approvals(rule_rows)
        return self._request(step, needs, now)

    def _request_row(self, step: Step, instance: Instance, now: datetime) -> dict[str, Any]:
        content = approval_payload(step, instance)
        content_digest = digest(content)
        value_column = step.value_column
        sla = step.approval_sla
        return {
            "approval_id": approval_key(
                instance_id=instance.instance_id, step=step.name, digest=content_digest
            ),
            "instance_id": instance.instance_id,
            "playbook": self.host.playbook.name,
            "playbook_version": instance.playbook_version,
            "workflow": instance.workflow,
            "insight": instance.insight,
            "partition_key": instance.partition_key,
            "entity_id": instance.entity_id,
            "rule": instance.rule,
            "step": step.name,
            "approvers": list(step.approvers),
            "min_approvals": step.min_approvals,
            "payload": payload.loads(payload.dumps(content)),
            "digest": content_digest,
            "value": _number(column_value(instance, value_column)) if value_column else None,
            "condition": step.approve_when,
            "on_expiry": step.on_expiry,
            "requested_at": now,
            "expires_at": now + step.approval_expiry,
            "sla_due_at": None if sla is None else now + sla,
            "run_id": self.host.run_id,
        }

    def _request(
        self, step: Step, instances: list[Instance], now: datetime
    ) -> list[tuple[Instance, dict[str, Any]]]:
        if not instances:
            return []
        host = self.host
        rows = [self._request_row(step, i, now) for i in instances]
        inserted = set(host.ledger.request_approvals(rows))
        # A request that already exists (a crash after it was opened) keeps its own times.
        existing = host.ledger.approval_rows(
            [r["approval_id"] for r in rows if r["approval_id"] not in inserted]
        )
        opened: list[tuple[Instance, dict[str, Any]]] = []
        decided: list[Mapping[str, Any]] = []
        for instance, row in zip(instances, rows, strict=True):
            stored = existing.get(row["approval_id"], row)
            instance.step_started_at = stored["requested_at"] or now
            if stored.get("status", PENDING) != PENDING:
                # Opened before a crash and decided since: apply the decision now, and finish
                # notifications that never went out (nobody needs asking any more).
                self._decided(step, instance, stored, now)
                decided.append(stored)
                continue
            instance.outputs[step.name] = {
                "status": stored.get("status", PENDING),
                "approval_id": row["approval_id"],
                "digest": row["digest"],
            }
            host._log(
                instance,
                step,
                PENDING,
                f"approval requested from {', '.join(step.approvers)} "
                f"({step.approve_when}); expires {stored['expires_at']:%Y-%m-%d %H:%M} UTC",
                now,
            )
            host._wait(instance, _next_look(stored, now))
            host.report.count(step.name, "requested")
            opened.append((instance, stored))
        if decided:
            self._finish_notifications(step, decided)
        host.report.approvals_requested += len(inserted)
        # Requests opened before a crash are notified again: the outbox keys (one per request
        # and approver) make a notification that was already delivered a no-op.
        return opened

    # -- applying decisions -------------------------------------------------------------------

    async def _apply(
        self, step: Step, waiting: list[Instance], now: datetime
    ) -> list[tuple[Instance, dict[str, Any]]]:
        host = self.host
        ids = {
            i.instance_id: str((i.outputs.get(step.name) or {}).get("approval_id", ""))
            for i in waiting
        }
        rows = host.ledger.approval_rows([a for a in ids.values() if a])
        reopen: list[Instance] = []
        expired: list[tuple[Instance, dict[str, Any]]] = []
        for instance in waiting:
            row = rows.get(ids[instance.instance_id])
            if row is None:
                # The request was never written (a crash between claim and request): open it.
                instance.step_started_at = None
                reopen.append(instance)
                continue
            if digest(approval_payload(step, instance)) != row["digest"]:
                if row["status"] in (PENDING, APPROVED, REJECTED) and row["applied_at"] is None:
                    host.ledger.close_approvals(
                        [row["approval_id"]],
                        status=VOID,
                        by="autoexec",
                        note="the payload changed after the request; a new approval is needed",
                        from_status=(PENDING, APPROVED, REJECTED),
                    )
                host._log(
                    instance, step, VOID, "the payload changed: a new approval is requested", now
                )
                host.report.count(step.name, "void")
                reopen.append(instance)
                continue
            status = row["status"]
            if status == PENDING and row["expires_at"] <= now:
                expired.append((instance, row))
            elif status == PENDING:
                host._wait(instance, _next_look(row, now))
            else:
                self._decided(step, instance, row, now)
        if expired:
            closed = set(
                host.ledger.close_approvals(
                    [row["approval_id"] for _, row in expired],
                    status=EXPIRED,
                    by="autoexec (expiry)",
                    note=f"no decision within {format_duration(step.approval_expiry)}; "
                    f"on_expiry={step.on_expiry}",
                )
            )
            late = host.ledger.approval_rows(
                [row["approval_id"] for _, row in expired if row["approval_id"] not in closed]
            )
            for instance, row in expired:
                if row["approval_id"] in closed:
                    self._expire(step, instance, row, now)
                else:
                    # A decision landed just before the expiry was written: it stands.
                    self._decided(step, instance, late[row["approval_id"]], now)
        return self._request(step, reopen, now)

    def _decided(
        self, step: Step, instance: Instance, row: Mapping[str, Any], now: datetime
    ) -> None:
        host = self.host
        status = row["status"]
        outcome = {
            "status": status,
            "by": row["decided_by"],
            "via": row["decided_via"],
            "note": row["decision_note"],
            "approval_id": row["approval_id"],
        }
        instance.outputs[step.name] = outcome
        if row["applied_at"] is None:
            host.applied_approvals.append(row["approval_id"])
        if status == APPROVED:
            host._log(
                instance,
                step,
                SUCCEEDED,
                f"approved by {row['decided_by']} ({row['decided_via']})",
                now,
            )
            host.report.approved += 1
            host.report.count(step.name, "approved")
            host._next_step(instance, now)
        elif status == REJECTED:
            note = f": {row['decision_note']}" if row["decision_note"] else ""
            host._reject(
                instance, step, f"rejected by {row['decided_by']} ({row['decided_via']}){note}", now
            )
            host.report.count(step.name, "rejected")
        elif status == EXPIRED:
            self._expire(step, instance, row, now)
        else:
            # void without a new request (should not happen): ask again rather than stall.
            instance.step_started_at = None
            instance.next_due = now

    def _expire(
        self, step: Step, instance: Instance, row: Mapping[str, Any], now: datetime
    ) -> None:
        host = self.host
        host.report.expired += 1
        host.report.count(step.name, "expired")
        after = f"no decision within {format_duration(step.approval_expiry)}"
        instance.outputs[step.name] = {
            "status": EXPIRED,
            "on_expiry": step.on_expiry,
            "approval_id": row["approval_id"],
        }
        if step.on_expiry == "approve":
            host._log(instance, step, SUCCEEDED, f"{after}: approved on expiry", now)
            host.report.approved += 1
            host._next_step(instance, now)
        elif step.on_expiry == "reject":
            host._reject(instance, step, f"{after}: rejected on expiry", now)
        else:
            host._fail(
                instance,
                step,
                f"step {step.name!r}: {after} (approvers: {', '.join(step.approvers)})",
                now,
            )

    # -- notifying ----------------------------------------------------------------------------

    def _finish_notifications(self, step: Step, requests: Sequence[Mapping[str, Any]]) -> None:
        keys = [
            key
            for request in requests
            for key in notify_keys(
                approval_id=request["approval_id"], approvers=list(step.approvers)
            )
        ]
        ledger = self.host.ledger
        states = ledger.states(keys)
        in_flight = [k for k in keys if states.get(k, (None, None))[0] == SENDING]
        if in_flight:
            ledger.recover(in_flight)
        ledger.skip_unsent(keys, detail="the request was decided before its notification went out")

    async def _notify(self, step: Step, opened: list[tuple[Instance, dict[str, Any]]]) -> None:
        if step.notify is None:
            return
        host = self.host
        rows: list[dict[str, Any]] = []
        for instance, request in opened:
            keys = notify_keys(approval_id=request["approval_id"], approvers=list(step.approvers))
            for approver, key in zip(step.approvers, keys, strict=True):
                rows.append(
                    {
                        "idempotency_key": key,
                        "playbook": host.playbook.name,
                        "playbook_version": instance.playbook_version,
                        "insight": instance.insight,
                        "partition_key": instance.partition_key,
                        "entity_id": instance.entity_id,
                        "rule": instance.rule,
                        "action": step.notify,
                        "decision": "notify",
                        "state": RESERVED,
                        "run_id": host.run_id,
                        "instance_id": instance.instance_id,
                        "step": step.name,
                        "detail": None,
                        "data": self._notice(step, instance, request, approver),
                    }
                )
        delivered, failed = await self._send(rows)
        host.report.notifications += delivered
        if failed:
            host.report.note_error(
                f"step {step.name!r}: {failed} approver notification(s) failed; the requests "
                "stay pending and can be decided from the command line"
            )

    def _notice(
        self, step: Step, instance: Instance, request: Mapping[str, Any], approver: str
    ) -> dict[str, Any]:
        links = self.host.links
        urls: dict[str, str | None] = {"approve_url": None, "reject_url": None}
        if links is not None:
            for decision in ("approve", "reject"):
                urls[f"{decision}_url"] = links.link(
                    approval_id=request["approval_id"],
                    digest=request["digest"],
                    decision=decision,
                    approver=approver,
                    expires_at=request["expires_at"],
                )
        return {
            **instance.data,
            "entity_id": instance.entity_id,
            "workflow": instance.workflow,
            "step": step.name,
            "steps": instance.outputs,
            "approval_id": request["approval_id"],
            "approver": approver,
            "approvers": list(step.approvers),
            "min_approvals": step.min_approvals,
            "value": request["value"],
            "condition": step.approve_when,
            "expires_at": request["expires_at"],
            "payload": request["payload"],
            **urls,
        }
