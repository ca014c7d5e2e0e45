"""Approval gates and transform steps advanced on a real ledger with an injected clock.

The destinations are Python channels recording every call (the real supplier API, SMTP sink and
approval endpoint are exercised by the stock-replenishment end-to-end tests); the ledger, the
delivery engine, the gate and the workflow state machine are the real ones.
"""

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest

from autoexec_dagster import (
    ActionLedger,
    Playbook,
    PythonChannel,
    Rule,
    Step,
    Workflow,
    advance_workflows,
    execute_plan,
    route,
)
from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.errors import ApprovalError, PlanError
from autoexec_dagster.playbook import Guardrails

DAY = "2026-12-01"
START = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
SECRET = "test-secret-0123456789abcdef"


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class Suppliers:
    """Drafts and submits purchase orders; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def channel(self, action: str) -> PythonChannel:
        def deliver(request: Any) -> dict[str, Any]:
            with self.lock:
                self.calls.append((action, request.entity_id, dict(request.data)))
            if action == "draft_po":
                data = request.data
                total = float(data["qty"]) * float(data["steps"]["choose"]["unit_price"])
                return {"po_id": f"PO-{request.entity_id}", "total": total}
            return {"status": action}

        return PythonChannel.from_callable(deliver, max_concurrency=4)

    def sent(self, action: str) -> Counter[str]:
        return Counter(entity for a, entity, _ in self.calls if a == action)


def cheapest(frame: pd.DataFrame) -> pd.DataFrame:
    """The cheapest supplier per SKU (prices are insight columns here)."""
    prices = frame[["price_a", "price_b"]]
    return pd.DataFrame(
        {
            "instance_id": frame["instance_id"],
            "supplier": prices.idxmin(axis=1).astype(str).str.removeprefix("price_"),
            "unit_price": prices.min(axis=1),
        }
    )


def stock_playbook(**gate: Any) -> Playbook:
    options: dict[str, Any] = {
        "approve_when": "`draft_po.total` > 5000",
        "approvers": ["procurement"],
        "expires_after": "2d",
        "notify": "approver_email",
    }
    options.update(gate)
    return Playbook(
        name="stock",
        entity_key="sku",
        rules=[Rule(name="short", when="shortfall > 0", workflow="replenish")],
        workflows={
            "replenish": Workflow(
                steps=[
                    Step(name="choose", transform=cheapest),
                    Step(name="draft_po", action="draft_po"),
                    Step(name="approval", **options),
                    Step(name="submit", action="submit_po"),
                ],
                on_failure="Purchase order not completed",
            )
        },
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )


def shortages() -> pd.DataFrame:
    # qty * min(price) = total: a 600, b 6000, c 12000, d 900
    return pd.DataFrame(
        {
            "sku": ["a", "b", "c", "d"],
            "shortfall": [5, 5, 5, 5],
            "qty": [10, 100, 200, 30],
            "price_a": [60.0, 70.0, 60.0, 30.0],
            "price_b": [80.0, 60.0, 90.0, 45.0],
        }
    )


@pytest.fixture
def world(tmp_path):
    clock = Clock(START)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    suppliers = Suppliers()
    channels = {a: suppliers.channel(a) for a in ("draft_po", "submit_po", "approver_email")}
    yield clock, ledger, suppliers, channels
    ledger.dispose()


def start(playbook, ledger, channels, **kwargs):
    return execute_plan(
        route(shortages(), playbook, partition_key=DAY),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        **kwargs,
    )


def advance(playbook, ledger, channels, **kwargs):
    return advance_workflows(playbook=playbook, ledger=ledger, channels=channels, **kwargs)


def pending_of(ledger, sku):
    pending = ledger.pending_approvals(playbook="stock")
    return pending.loc[pending["entity_id"] == sku, "approval_id"].tolist()


def test_below_the_threshold_orders_go_through_and_above_it_they_wait(world):
    clock, ledger, suppliers, channels = world
    playbook = stock_playbook()
    report = start(playbook, ledger, channels)
    assert report.workflows_started == 4
    # The transform chose the cheapest supplier; the PO total follows from it.
    drafted = {e: d for a, e, d in suppliers.calls if a == "draft_po"}
    assert drafted["b"]["steps"]["choose"] == {"supplier": "b", "unit_price": 60.0}
    assert suppliers.sent("submit_po") == Counter({"a": 1, "d": 1})
    pending = ledger.pending_approvals(playbook="stock").set_index("entity_id")
    assert sorted(pending.index) == ["b", "c"]
    assert pending.loc["b", "value"] == 6000.0 and pending.loc["c", "value"] == 12000.0
    # Each approver was notified once per request.
    assert suppliers.sent("approver_email") == Counter({"b": 1, "c": 1})
    # The rule's approvals are recorded too, as approved by the rule.
    by_rule = ledger.approvals(playbook="stock", status="approved").set_index("entity_id")
    assert sorted(by_rule.index) == ["a", "d"] and set(by_rule["decided_by"]) == {"rule"}
    # Nothing moves while nobody decides.
    clock.advance(timedelta(hours=1))
    again = advance(playbook, ledger, channels)
    assert again.advanced == 0 and suppliers.sent("submit_po") == Counter({"a": 1, "d": 1})


def test_a_decision_wakes_the_workflow_and_applies_once(world):
    clock, ledger, suppliers, channels = world
    playbook = stock_playbook()
    start(playbook, ledger, channels)
    clock.advance(timedelta(hours=1))
    assert ledger.due_partitions(playbook="stock") == []
    ledger.approve(pending_of(ledger, "b"), by="procurement", note="ok", via="cli")
    ledger.reject(pending_of(ledger, "c"), by="procurement", note="too much", via="python")
    # The decisions made both instances due: the sensor's query sees the partition.
    assert [p for p, _, _ in ledger.due_partitions(playbook="stock")] == [DAY]
    report = advance(playbook, ledger, channels)
    assert report.approved == 1 and report.rejected == 1
    assert suppliers.sent("submit_po") == Counter({"a": 1, "b": 1, "d": 1})
    states = ledger.instances(playbook="stock").set_index("entity_id")["state"].to_dict()
    assert states == {"a": "succeeded", "b": "succeeded", "c": "rejected", "d": "succeeded"}
    decided = ledger.approvals(playbook="stock", status=["approved", "rejected"])
    people = decided[decided["decided_by"] != "rule"].set_index("entity_id")
    assert (
        people.loc["b", "decided_via"] == "cli" and people.loc["c", "decision_note"] == "too much"
    )
    # Applied once: nothing is due any more and a second advance does nothing.
    assert ledger.due_partitions(playbook="stock") == []
    assert advance(playbook, ledger, channels).advanced == 0
    assert max(suppliers.sent("submit_po").values()) == 1
    with pytest.raises(ApprovalError, match="not pending"):
        ledger.approve(people.loc[["b"], "approval_id"].tolist(), by="procurement")


def test_four_eyes_need_two_distinct_approvers(world):
    _clock, ledger, suppliers, channels = world
    playbook = stock_playbook(approvers=["ana", "bo", "cy"], min_approvals=2)
    start(playbook, ledger, channels)
    (request,) = pending_of(ledger, "b")
    first = ledger.approve([request], by="ana")
    assert first[0].status == "pending" and (first[0].approvals, first[0].needed) == (1, 2)
    with pytest.raises(ApprovalError, match="ana already decided"):
        ledger.approve([request], by="ana")
    with pytest.raises(ApprovalError, match="'mallory' is not an approver"):
        ledger.approve([request], by="mallory")
    advance(playbook, ledger, channels)
    assert "b" not in suppliers.sent("submit_po")
    assert ledger.approve([request], by="cy")[0].status == "approved"
    advance(playbook, ledger, channels)
    assert suppliers.sent("submit_po")["b"] == 1
    row = ledger.approvals(approval_ids=[request]).iloc[0]
    assert row["decided_by"] == "ana, cy"
    # Every approver of b and c got a notification of their own.
    assert suppliers.sent("approver_email") == Counter({"b": 3, "c": 3})


@pytest.mark.parametrize(
    ("on_expiry", "state", "submitted", "escalated"),
    [
        ("reject", "rejected", False, 0),
        ("approve", "succeeded", True, 0),
        ("escalate", "failed", False, 1),
    ],
)
def test_expiry_applies_on_expiry(world, on_expiry, state, submitted, escalated):
    clock, ledger, suppliers, channels = world
    playbook = stock_playbook(on_expiry=on_expiry, sla="1d")
    start(playbook, ledger, channels)
    (request,) = pending_of(ledger, "b")
    clock.advance(timedelta(days=1, hours=23))
    # Past the SLA the instances were due once (a run evaluates the SLA check); they wait on.
    early = advance(playbook, ledger, channels)
    assert early.expired == 0 and early.waiting == 2
    assert advance(playbook, ledger, channels).advanced == 0  # not due again before the expiry
    clock.advance(timedelta(hours=1))
    with pytest.raises(ApprovalError, match="expired"):
        ledger.approve([request], by="procurement")
    report = advance(playbook, ledger, channels)
    assert report.expired == 2
    instances = ledger.instances(playbook="stock").set_index("entity_id")
    assert instances.loc["b", "state"] == state
    assert ("b" in suppliers.sent("submit_po")) is submitted
    assert ledger.approvals(approval_ids=[request]).iloc[0]["status"] == "expired"
    cases = ledger.escalations(playbook="stock", status=None)
    assert len(cases[cases["entity_id"] == "b"]) == escalated
    if escalated:
        assert "no decision within 2d" in cases.iloc[0]["reason"]


def test_a_changed_payload_voids_the_approval_and_asks_again(world):
    _clock, ledger, suppliers, channels = world
    playbook = stock_playbook()
    start(playbook, ledger, channels)
    (old,) = pending_of(ledger, "b")
    instance = ledger.instances(playbook="stock", entity_id="b").iloc[0]["instance_id"]
    ledger.approve([old], by="procurement")
    # Before the approval is applied, someone changes the order: nobody approved this one.
    ledger.amend_instance(
        instance, step="draft_po", changes={"total": 9000.0}, by="ana", note="more units"
    )
    report = advance(playbook, ledger, channels)
    assert report.approvals_requested == 1 and "b" not in suppliers.sent("submit_po")
    assert ledger.approvals(approval_ids=[old]).iloc[0]["status"] == "void"
    (new,) = pending_of(ledger, "b")
    assert new != old
    assert ledger.approvals(approval_ids=[new]).iloc[0]["value"] == 9000.0
    assert suppliers.sent("approver_email")["b"] == 2  # asked again for the new payload
    ledger.approve([new], by="procurement")
    advance(playbook, ledger, channels)
    submitted = [d for a, e, d in suppliers.calls if a == "submit_po" and e == "b"]
    assert len(submitted) == 1 and submitted[0]["steps"]["draft_po"]["total"] == 9000.0


def test_notifications_carry_signed_links_for_each_approver(world):
    clock, ledger, suppliers, channels = world
    links = ApprovalLinks(base_url="http://127.0.0.1:8765", secret=SECRET)
    playbook = stock_playbook(approvers=["ana", "bo"])
    start(playbook, ledger, channels, approval_links=links)
    notices = [d for a, _, d in suppliers.calls if a == "approver_email"]
    assert sorted((n["entity_id"], n["approver"]) for n in notices) == [
        ("b", "ana"),
        ("b", "bo"),
        ("c", "ana"),
        ("c", "bo"),
    ]
    for notice in notices:
        token = notice["approve_url"].split("token=", 1)[1]
        claims = links.verify(token, now=clock.now)
        assert claims.approval_id == notice["approval_id"] and claims.approver == notice["approver"]
        assert claims.decision == "approve"
        assert links.verify(notice["reject_url"].split("token=")[1], now=clock.now).decision == (
            "reject"
        )


def test_a_transform_that_returns_what_it_may_not_is_refused_and_nothing_moves(world):
    _clock, ledger, suppliers, channels = world

    def no_instance_column(frame):
        return frame[["price_a"]]

    def invents(frame):
        return pd.DataFrame({"instance_id": ["someone-else"], "supplier": ["x"]})

    for bad, message in (
        (no_instance_column, "without the 'instance_id' column"),
        (invents, "returned 1 instance\\(s\\) it was not given"),
    ):
        playbook = stock_playbook()
        steps = list(playbook.workflows["replenish"].steps)
        steps[0] = Step(name="choose", transform=bad)
        broken = playbook.model_copy(
            update={"workflows": {"replenish": Workflow(steps=steps, on_failure="x")}}
        )
        with pytest.raises(PlanError, match=message):
            start(broken, ledger, channels)
        assert suppliers.calls == []
        # The instances are where they were: at the first step, free for the fixed code.
        instances = ledger.instances(playbook="stock")
        assert set(instances["state"]) == {"running"} and set(instances["step_index"]) == {0}
    report = advance(stock_playbook(), ledger, channels)
    assert report.approvals_requested == 2 and suppliers.sent("submit_po") == Counter(
        {"a": 1, "d": 1}
    )


def test_an_unknown_notify_channel_is_refused_before_anything_runs(world):
    _clock, ledger, suppliers, channels = world
    without = {k: v for k, v in channels.items() if k != "approver_email"}
    with pytest.raises(
        PlanError, match=r"'approver_email' \(workflow 'replenish', step 'approval'\)"
    ):
        start(stock_playbook(), ledger, without)
    assert ledger.instances(playbook="stock").empty and suppliers.calls == []


def test_build_execution_defs_names_the_step_whose_notify_channel_is_missing():
    import dagster as dg

    from autoexec_dagster import build_execution_defs
    from autoexec_dagster.errors import ChannelConfigError

    suppliers = Suppliers()
    with pytest.raises(
        ChannelConfigError,
        match=r"'approver_email' \(workflow replenish step approval notify\)",
    ):
        build_execution_defs(
            insight=dg.AssetKey("stock_shortages"),
            playbook=stock_playbook(),
            channels={a: suppliers.channel(a) for a in ("draft_po", "submit_po")},
            ledger="sqlite://",
        )
