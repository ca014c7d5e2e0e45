"""The ledger's approval requests and decisions (autoexec_dagster/ledger/approvals.py).

Real SQLite ledgers in tmp_path (and PostgreSQL where it runs); time is an injected clock. The
helpers at the top create requests the way the workflow's approval step does, and are shared by the
CLI and server tests.
"""

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from autoexec_dagster.errors import ApprovalError
from autoexec_dagster.ledger.action_ledger import ActionLedger

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
PLAYBOOK = "stock_replenishment"


class Clock:
    """A clock the test moves forward (the ledger's ``clock=``)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def payload_digest(payload: Mapping[str, Any]) -> str:
    """The SHA-256 of the payload's canonical JSON, as the approval step computes it."""
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def approval_row(
    entity_id: str,
    *,
    payload: Mapping[str, Any] | None = None,
    value: float | None = None,
    approvers: Sequence[str] = ("ana", "bob"),
    min_approvals: int = 1,
    partition_key: str = "2026-12-03",
    playbook: str = PLAYBOOK,
    step: str = "approve_po",
    requested_at: datetime = T0,
    expires_in: timedelta = timedelta(days=2),
    sla_in: timedelta | None = timedelta(hours=8),
    instance_id: str | None = None,
) -> dict[str, Any]:
    """Every non-null column of ``autoexec_approvals`` for one request (id = hash of instance,
    step and payload digest, so a changed payload is a new request)."""
    body = dict(payload) if payload is not None else {"supplier": "acme", "quantity": 10}
    total = value if value is not None else float(body.get("total", 100.0))
    digest = payload_digest(body)
    instance = (
        instance_id
        or hashlib.blake2b(
            f"{playbook}/{partition_key}/{entity_id}".encode(), digest_size=16
        ).hexdigest()
    )
    approval_id = hashlib.blake2b(
        f"{instance}\x1f{step}\x1f{digest}".encode(), digest_size=16
    ).hexdigest()
    return {
        "approval_id": approval_id,
        "instance_id": instance,
        "playbook": playbook,
        "playbook_version": "v1",
        "workflow": "replenish",
        "insight": "stock_forecast",
        "partition_key": partition_key,
        "entity_id": entity_id,
        "rule": "shortage",
        "step": step,
        "approvers": list(approvers),
        "min_approvals": min_approvals,
        "payload": body,
        "digest": digest,
        "value": total,
        "on_expiry": "reject",
        "requested_at": requested_at,
        "expires_at": requested_at + expires_in,
        "sla_due_at": None if sla_in is None else requested_at + sla_in,
    }


def instance_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A workflow instance for an approval row (what ``start_instances`` takes)."""
    return {
        "instance_id": row["instance_id"],
        "playbook": row["playbook"],
        "playbook_version": row["playbook_version"],
        "workflow": row["workflow"],
        "insight": row["insight"],
        "partition_key": row["partition_key"],
        "entity_id": row["entity_id"],
        "rule": row["rule"],
        "step": row["step"],
        "data": "{}",
        "run_id": "run-1",
    }


def request(ledger: ActionLedger, *rows: Mapping[str, Any]) -> list[str]:
    """Insert the requests; returns their ids (all of them must be new)."""
    inserted = ledger.request_approvals(list(rows))
    assert sorted(inserted) == sorted(r["approval_id"] for r in rows)
    return [str(r["approval_id"]) for r in rows]


def status_of(ledger: ActionLedger, approval_id: str) -> str:
    return str(ledger.approval_rows([approval_id])[approval_id]["status"])


def decisions_of(ledger: ActionLedger, *approval_ids: str) -> list[tuple[str, str, str]]:
    frame = ledger.approval_decisions(list(approval_ids))
    return sorted(zip(frame["approval_id"], frame["approver"], frame["decision"], strict=True))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path, clock: Clock) -> ActionLedger:
    return ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)


def test_a_request_is_stored_with_its_payload_and_listed_as_pending(ledger: ActionLedger) -> None:
    row = approval_row("sku-1", payload={"supplier": "acme", "total": 1250.0})
    (approval_id,) = request(ledger, row)

    stored = ledger.approval_rows([approval_id])[approval_id]
    assert stored["payload"] == {"supplier": "acme", "total": 1250.0}
    assert stored["approvers"] == ["ana", "bob"]
    assert stored["status"] == "pending" and stored["value"] == 1250.0
    pending = ledger.pending_approvals(playbook=PLAYBOOK)
    assert pending["approval_id"].tolist() == [approval_id]
    # Requesting it again inserts nothing: the id is the request.
    assert ledger.request_approvals([row]) == []


def test_one_approval_approves_a_request_that_needs_one(ledger: ActionLedger, clock: Clock) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1"))
    clock.advance(timedelta(minutes=5))

    (result,) = ledger.approve([approval_id], by="ana", note="fine", via="cli")

    assert (result.status, result.approvals, result.needed) == ("approved", 1, 1)
    stored = ledger.approval_rows([approval_id])[approval_id]
    assert stored["status"] == "approved"
    assert stored["decided_by"] == "ana" and stored["decided_via"] == "cli"
    assert stored["decision_note"] == "fine" and stored["decided_at"] == clock.now


def test_min_approvals_two_needs_two_distinct_approvers(ledger: ActionLedger) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1", min_approvals=2))

    (first,) = ledger.approve([approval_id], by="ana")
    assert (first.status, first.approvals, first.needed) == ("pending", 1, 2)
    assert status_of(ledger, approval_id) == "pending"
    with pytest.raises(ApprovalError, match="ana already decided"):
        ledger.approve([approval_id], by="ana")

    (second,) = ledger.approve([approval_id], by="bob")
    assert (second.status, second.approvals) == ("approved", 2)
    stored = ledger.approval_rows([approval_id])[approval_id]
    assert stored["status"] == "approved" and stored["decided_by"] == "ana, bob"
    assert decisions_of(ledger, approval_id) == [
        (approval_id, "ana", "approve"),
        (approval_id, "bob", "approve"),
    ]


def test_one_rejection_rejects_even_after_an_approval(ledger: ActionLedger) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1", min_approvals=2))
    ledger.approve([approval_id], by="ana")

    (result,) = ledger.reject([approval_id], by="bob", note="supplier is on hold")

    assert result.status == "rejected"
    stored = ledger.approval_rows([approval_id])[approval_id]
    assert stored["status"] == "rejected" and stored["decided_by"] == "bob"
    assert stored["decision_note"] == "supplier is on hold"


def test_a_rejection_needs_a_note(ledger: ActionLedger) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1"))
    with pytest.raises(ApprovalError, match="needs a note"):
        ledger.reject([approval_id], by="ana", note="  ")
    assert status_of(ledger, approval_id) == "pending"
    assert decisions_of(ledger, approval_id) == []


def test_a_decider_who_is_not_listed_is_refused(ledger: ActionLedger) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1"))

    with pytest.raises(ApprovalError, match="'mallory' is not an approver"):
        ledger.approve([approval_id], by="mallory")

    assert status_of(ledger, approval_id) == "pending"
    assert decisions_of(ledger, approval_id) == []


def test_a_second_decision_by_the_same_person_is_refused(ledger: ActionLedger) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1", min_approvals=2))
    ledger.approve([approval_id], by="ana")

    # Changing one's mind is a second decision too.
    with pytest.raises(ApprovalError, match="each approver decides once"):
        ledger.reject([approval_id], by="ana", note="changed my mind")

    assert status_of(ledger, approval_id) == "pending"
    assert decisions_of(ledger, approval_id) == [(approval_id, "ana", "approve")]


def test_a_request_no_longer_pending_is_refused(ledger: ActionLedger) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1"))
    ledger.approve([approval_id], by="ana")

    with pytest.raises(ApprovalError, match=r"not pending \(it is approved by ana\)"):
        ledger.approve([approval_id], by="bob")
    assert decisions_of(ledger, approval_id) == [(approval_id, "ana", "approve")]

    (voided,) = request(ledger, approval_row("sku-2"))
    assert ledger.close_approvals([voided], status="void", by="autoexec", note="payload changed")
    with pytest.raises(ApprovalError, match="it is void"):
        ledger.approve([voided], by="ana")
    assert decisions_of(ledger, voided) == []


def test_an_unknown_request_is_refused(ledger: ActionLedger) -> None:
    with pytest.raises(ApprovalError, match="no such approval request"):
        ledger.approve(["0" * 32], by="ana")


def test_an_expired_request_is_refused(ledger: ActionLedger, clock: Clock) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1", expires_in=timedelta(hours=1)))
    clock.advance(timedelta(minutes=59))
    (other,) = request(
        ledger,
        approval_row("sku-2", requested_at=clock.now, expires_in=timedelta(hours=1)),
    )
    clock.advance(timedelta(minutes=1))

    # Exactly at the expiry the request is expired: the decision and the timeout do not both win.
    with pytest.raises(ApprovalError, match="expired at 2026-12-03 10:00 UTC"):
        ledger.approve([approval_id], by="ana")
    assert status_of(ledger, approval_id) == "pending"
    assert decisions_of(ledger, approval_id) == []
    (result,) = ledger.approve([other], by="ana")
    assert result.status == "approved"


def test_a_decision_on_a_changed_payload_is_refused(ledger: ActionLedger) -> None:
    row = approval_row("sku-1", payload={"supplier": "acme", "total": 900.0})
    (approval_id,) = request(ledger, row)
    seen = payload_digest({"supplier": "acme", "total": 9000.0})

    with pytest.raises(ApprovalError, match="the payload changed"):
        ledger.approve([approval_id], by="ana", digest=seen, via="link")
    assert decisions_of(ledger, approval_id) == []

    (result,) = ledger.approve([approval_id], by="ana", digest=row["digest"], via="link")
    assert result.status == "approved"


def test_a_mixed_list_decides_nothing(ledger: ActionLedger) -> None:
    good, also_good, theirs = request(
        ledger,
        approval_row("sku-1"),
        approval_row("sku-2"),
        approval_row("sku-3", approvers=("carol",)),
    )

    with pytest.raises(ApprovalError, match=r"nothing decided \(1 of 3 request\(s\) refused\)"):
        ledger.approve([good, also_good, theirs], by="ana", via="cli")

    assert [status_of(ledger, i) for i in (good, also_good, theirs)] == ["pending"] * 3
    assert decisions_of(ledger, good, also_good, theirs) == []
    assert len(ledger.approve([good, also_good], by="ana")) == 2


def test_a_bad_decider_name_or_via_is_refused(ledger: ActionLedger) -> None:
    (approval_id,) = request(ledger, approval_row("sku-1"))
    with pytest.raises(ApprovalError, match="decider's name"):
        ledger.approve([approval_id], by=" ")
    with pytest.raises(ApprovalError, match="via must be one of"):
        ledger.approve([approval_id], by="ana", via="email")
    assert decisions_of(ledger, approval_id) == []


def test_a_decided_request_makes_its_instance_due_now(ledger: ActionLedger, clock: Clock) -> None:
    pending_row, decided_row = approval_row("sku-1", min_approvals=2), approval_row("sku-2")
    ledger.start_instances([instance_row(pending_row), instance_row(decided_row)])
    request(ledger, pending_row, decided_row)
    started = clock.now
    clock.advance(timedelta(hours=3))

    ledger.approve([pending_row["approval_id"], decided_row["approval_id"]], by="ana")

    due = {
        str(i): d
        for i, d in zip(
            ledger.instances(playbook=PLAYBOOK)["instance_id"],
            ledger.instances(playbook=PLAYBOOK)["next_due"],
            strict=True,
        )
    }

    def aware(value: Any) -> datetime:
        moment = value.to_pydatetime() if hasattr(value, "to_pydatetime") else value
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    # Only the request that became decided wakes its instance; one approval of two does not.
    assert aware(due[decided_row["instance_id"]]) == clock.now
    assert aware(due[pending_row["instance_id"]]) == started
    assert ledger.decided_unapplied([pending_row["instance_id"], decided_row["instance_id"]]) == {
        decided_row["instance_id"]
    }


def test_counts_sum_the_value_per_status(ledger: ActionLedger) -> None:
    ids = request(
        ledger,
        approval_row("sku-1", value=100.0),
        approval_row("sku-2", value=250.0),
        approval_row("sku-3", value=40.0),
    )
    ledger.approve([ids[0]], by="ana")

    counts = {c["status"]: c for c in ledger.approval_counts(playbook=PLAYBOOK)}
    assert (counts["pending"]["count"], counts["pending"]["value"]) == (2, 290.0)
    assert (counts["approved"]["count"], counts["approved"]["value"]) == (1, 100.0)
    assert counts["pending"]["oldest_requested_at"] == T0


def test_two_approvers_deciding_at_once_both_count(ledger_url: str) -> None:
    """Four eyes under concurrency: each approval sees the other's, so the request ends approved
    (not stuck pending with two approvals) and both decisions are recorded."""
    ledgers = [ActionLedger(ledger_url, clock=Clock()) for _ in range(2)]
    rows = [approval_row(f"sku-{i}", min_approvals=2) for i in range(5)]
    request(ledgers[0], *rows)
    for row in rows:
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def decide(
            ledger: ActionLedger,
            name: str,
            approval_id: str = row["approval_id"],
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                barrier.wait(timeout=10)
                ledger.approve([approval_id], by=name, via="python")
            except BaseException as exc:  # reported below, on the test's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=decide, args=(ledgers[0], "ana")),
            threading.Thread(target=decide, args=(ledgers[1], "bob")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        stored = ledgers[0].approval_rows([row["approval_id"]])[row["approval_id"]]
        assert stored["status"] == "approved"
        assert sorted(stored["decided_by"].split(", ")) == ["ana", "bob"]
        assert decisions_of(ledgers[0], row["approval_id"]) == [
            (row["approval_id"], "ana", "approve"),
            (row["approval_id"], "bob", "approve"),
        ]
