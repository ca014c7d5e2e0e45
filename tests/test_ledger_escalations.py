"""Deciding escalations in the ledger: approvals reserve the proposed action, decisions apply once.

Real ledgers (SQLite in tmp_path; PostgreSQL where the server runs), real routing and recording.
"""

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from autoexec_dagster import PythonChannel, execute_plan, route
from autoexec_dagster.channels.base import ActionRequest, Channel
from autoexec_dagster.ledger import payload, schema
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.escalations import (
    APPROVED_DECISION,
    EscalationError,
    approved_action_key,
)
from autoexec_dagster.playbook import Guardrails, Playbook, Rule
from tests.conftest import churn_scores

PLAYBOOK = "churn_outreach"
INSIGHT = "churn_scores"
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class Clock:
    """The ledger's clock, moved by the test instead of sleeping."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def proposing_playbook() -> Playbook:
    """The churn playbook whose high-value escalation proposes a CRM task (issue 8)."""
    return Playbook(
        name=PLAYBOOK,
        entity_key="customer_id",
        rules=[
            Rule(
                name="vip_at_risk",
                when="churn_score >= 0.7 and lifetime_value >= 5000",
                escalate="High-value customer at risk: an account manager should call",
                action="crm_task",
            ),
            Rule(
                name="unsure",
                when="churn_score >= 0.6 and confidence < 0.2",
                escalate="The model is unsure about this customer",
            ),
            Rule(name="at_risk", when="churn_score >= 0.7", action="retention_email"),
            Rule(name="watch", when="churn_score >= 0.5", action="crm_task"),
        ],
        guardrails=Guardrails(max_flagged_fraction=0.9),
    )


class Recorder:
    """A destination that records every delivery's key, per action."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.keys: list[tuple[str, str]] = []

    def __call__(self, request: ActionRequest) -> str:
        with self._lock:
            self.keys.append((request.action, request.idempotency_key))
        return "recorded"

    def channels(self) -> dict[str, Channel]:
        return {
            "retention_email": PythonChannel.from_callable(self),
            "crm_task": PythonChannel.from_callable(self),
        }


def execute_partition(
    ledger: ActionLedger,
    partition: str,
    *,
    channels: dict[str, Channel],
    n: int = 300,
    seed: int = 7,
    playbook: Playbook | None = None,
) -> Any:
    """Route and execute one partition of generated churn scores."""
    book = playbook or proposing_playbook()
    plan = route(churn_scores(n, seed=seed), book, partition_key=partition, insight_name=INSIGHT)
    return execute_plan(plan, playbook=book, ledger=ledger, channels=channels)


def snapshot(ledger: ActionLedger) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a decision may write, to prove a refusal wrote nothing."""
    tables = (schema.escalations, schema.actions, schema.suppressions)
    with ledger.engine.connect() as conn:
        return {
            t.name: sorted(
                (tuple(map(str, row)) for row in conn.execute(sa.select(t))), key=lambda r: r[0]
            )
            for t in tables
        }


def open_keys(ledger: ActionLedger, rule: str | None = None) -> list[str]:
    queue = ledger.select_escalations(playbook=PLAYBOOK, rule=rule)
    return queue["idempotency_key"].astype(str).tolist()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def ledger(ledger_url: str, clock: Clock, recorder: Recorder) -> Iterator[ActionLedger]:
    """A ledger (SQLite and PostgreSQL) holding partition p1, executed."""
    opened = ActionLedger(ledger_url, clock=clock)
    execute_partition(opened, "p1", channels=recorder.channels())
    yield opened
    opened.dispose()


@pytest.fixture
def sqlite_ledger(sqlite_url: str, clock: Clock, recorder: Recorder) -> ActionLedger:
    """The same on SQLite only, for checks of input that never reach the database."""
    opened = ActionLedger(sqlite_url, clock=clock)
    execute_partition(opened, "p1", channels=recorder.channels())
    return opened


def test_an_escalation_carries_its_rules_proposed_action(ledger: ActionLedger) -> None:
    queue = ledger.select_escalations(playbook=PLAYBOOK)
    vip = queue[queue["rule"] == "vip_at_risk"]
    unsure = queue[queue["rule"] == "unsure"]
    assert len(vip) > 0 and len(unsure) > 0
    assert set(vip["proposed_action"]) == {"crm_task"}
    assert unsure["proposed_action"].isna().all()
    # Nothing runs before a person approves: no approved row is in the outbox.
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == []


def test_approval_reserves_the_action_in_the_same_transaction(
    ledger: ActionLedger, clock: Clock
) -> None:
    key = open_keys(ledger, "vip_at_risk")[0]
    escalation = ledger.select_escalations(playbook=PLAYBOOK, keys=[key]).iloc[0]

    (decision,) = ledger.approve_escalations([key], by="ana", note="call booked", via="cli")

    assert decision.status == "approved" and decision.decided_by == "ana"
    assert decision.via == "cli" and decision.decided_at == clock.now
    assert decision.action_key == approved_action_key(key)
    row = ledger.select_escalations(playbook=PLAYBOOK, keys=[key], statuses=None).iloc[0]
    assert (row["status"], row["resolved_by"], row["resolution"], row["decided_via"]) == (
        "approved",
        "ana",
        "call booked",
        "cli",
    )
    actions = ledger.actions(playbook=PLAYBOOK)
    [action] = actions[actions["idempotency_key"] == decision.action_key].to_dict("records")
    assert action["state"] == "reserved" and action["decision"] == APPROVED_DECISION
    assert (action["action"], action["rule"], action["entity_id"], action["partition_key"]) == (
        "crm_task",
        "vip_at_risk",
        escalation["entity_id"],
        "p1",
    )
    with ledger.engine.connect() as conn:
        stored = conn.execute(
            sa.select(schema.actions.c.payload).where(
                schema.actions.c.idempotency_key == decision.action_key
            )
        ).scalar_one()
    assert payload.loads(stored)["lifetime_value"] == pytest.approx(
        float(pd.Series([escalation["data"]]).map(payload.loads).iloc[0]["lifetime_value"])
    )
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == [("p1", 1)]


def test_a_second_approval_does_nothing_and_says_so(ledger: ActionLedger) -> None:
    key = open_keys(ledger, "vip_at_risk")[0]
    ledger.approve_escalations([key], by="ana")
    before = snapshot(ledger)

    with pytest.raises(
        EscalationError, match=rf"{key}: not open \(it is approved by ana via python"
    ):
        ledger.approve_escalations([key], by="bob")

    assert snapshot(ledger) == before
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == [("p1", 1)]


def test_an_approval_after_a_resolve_does_nothing(sqlite_ledger: ActionLedger) -> None:
    key = open_keys(sqlite_ledger, "vip_at_risk")[0]
    (resolved,) = sqlite_ledger.resolve_escalations(
        [key], by="bob", note="called already", via="link"
    )
    assert resolved.status == "resolved" and resolved.via == "link"
    before = snapshot(sqlite_ledger)

    with pytest.raises(EscalationError, match=r"not open \(it is resolved by bob via link"):
        sqlite_ledger.approve_escalations([key], by="ana")

    assert snapshot(sqlite_ledger) == before
    assert sqlite_ledger.approved_action_states([key]) == {}


def _together(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released at once; results or exceptions, in order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_racing_decisions_apply_once(ledger: ActionLedger, ledger_url: str, clock: Clock) -> None:
    keys = open_keys(ledger, "vip_at_risk")[:4]
    deciders = [ActionLedger(ledger_url, clock=clock) for _ in range(6)]
    for key in keys:
        # Three people approve and three resolve the same escalation at the same moment.
        results = _together(
            6,
            lambda i, k=key: (
                deciders[i].approve_escalations([k], by=f"approver{i}")
                if i % 2 == 0
                else deciders[i].resolve_escalations([k], by=f"resolver{i}")
            ),
        )
        won = [r for r in results if not isinstance(r, Exception)]
        lost = [r for r in results if isinstance(r, Exception)]
        assert len(won) == 1, results
        assert all(isinstance(r, EscalationError) and "not open" in str(r) for r in lost)
        (decision,) = won[0]
        states = ledger.approved_action_states([key])
        if decision.status == "approved":
            assert states == {key: "reserved"}
        else:
            assert states == {}
    for other in deciders:
        other.dispose()
    actions = ledger.actions(playbook=PLAYBOOK)
    approved = actions[actions["decision"] == APPROVED_DECISION]
    assert len(approved) == len(set(approved["idempotency_key"])) <= len(keys)


def test_unknown_keys_refuse_the_whole_call(ledger: ActionLedger) -> None:
    key = open_keys(ledger, "vip_at_risk")[0]
    before = snapshot(ledger)

    with pytest.raises(EscalationError, match=r"nothing decided \(1 of 2.*0{32}: no escalation"):
        ledger.approve_escalations([key, "0" * 32], by="ana")

    assert snapshot(ledger) == before


def test_an_escalation_without_a_proposed_action_cannot_be_approved(
    sqlite_ledger: ActionLedger,
) -> None:
    vip = open_keys(sqlite_ledger, "vip_at_risk")[0]
    unsure = open_keys(sqlite_ledger, "unsure")[0]
    before = snapshot(sqlite_ledger)

    with pytest.raises(EscalationError, match=rf"{unsure}: it proposes no action to approve"):
        sqlite_ledger.approve_escalations([vip, unsure], by="ana")

    assert snapshot(sqlite_ledger) == before


def test_rejection_needs_a_note_and_records_it(sqlite_ledger: ActionLedger) -> None:
    key = open_keys(sqlite_ledger, "vip_at_risk")[0]
    before = snapshot(sqlite_ledger)
    for note in ("", "   "):
        with pytest.raises(EscalationError, match="a rejection needs a note"):
            sqlite_ledger.reject_escalations([key], by="ana", note=note)
    assert snapshot(sqlite_ledger) == before

    (decision,) = sqlite_ledger.reject_escalations(
        [key], by="ana", note="customer is leaving anyway"
    )

    assert decision.status == "rejected" and decision.note == "customer is leaving anyway"
    assert sqlite_ledger.approved_action_states([key]) == {}
    with pytest.raises(EscalationError, match=r"not open \(it is rejected by ana"):
        sqlite_ledger.approve_escalations([key], by="bob")


@pytest.mark.parametrize(
    ("by", "via", "approvers", "message"),
    [
        ("", "cli", None, "needs the decider's name"),
        ("   ", "cli", None, "needs the decider's name"),
        ("ana\nroot", "cli", None, "without control characters"),
        ("x" * 201, "cli", None, "at most 200 characters"),
        ("ana", "email", None, "via must be one of"),
        ("mallory", "cli", {"ana", "bob"}, "'mallory' may not decide"),
        ("ana", "cli", set(), "approvers: nobody"),
    ],
)
def test_a_decider_nobody_may_be_is_refused(
    sqlite_ledger: ActionLedger, by: str, via: str, approvers: set[str] | None, message: str
) -> None:
    key = open_keys(sqlite_ledger, "vip_at_risk")[0]
    before = snapshot(sqlite_ledger)

    with pytest.raises(EscalationError, match=message):
        sqlite_ledger.approve_escalations([key], by=by, via=via, approvers=approvers)

    assert snapshot(sqlite_ledger) == before
    assert (
        sqlite_ledger.approve_escalations([key], by="ana", approvers={"ana"})[0].status
        == "approved"
    )


def test_suppressing_an_escalation_records_who_and_until_when(
    ledger: ActionLedger, clock: Clock
) -> None:
    key = open_keys(ledger, "unsure")[0]

    (decision,) = ledger.suppress_escalations(
        [key], for_="30d", by="ana", note="customer on holiday", via="cli"
    )

    assert decision.status == "suppressed"
    assert decision.suppressed_until == clock.now + timedelta(days=30)
    active = ledger.active_suppressions(playbook=PLAYBOOK)
    hold = active[decision.entity_id]
    assert (hold.suppressed_by, hold.note, hold.via, hold.escalation_key) == (
        "ana",
        "customer on holiday",
        "cli",
        key,
    )
    assert hold.until == clock.now + timedelta(days=30)
    clock.advance(timedelta(days=30))
    assert ledger.active_suppressions(playbook=PLAYBOOK) == {}
    assert len(ledger.suppressions(playbook=PLAYBOOK, active_only=False)) == 1


@pytest.mark.parametrize("period", ["30 days", "0d", "-1d", "", "1000000w", "P30D"])
def test_an_unparsable_suppression_period_is_refused(
    sqlite_ledger: ActionLedger, period: str
) -> None:
    key = open_keys(sqlite_ledger, "unsure")[0]
    before = snapshot(sqlite_ledger)

    with pytest.raises(EscalationError, match=r"the suppression period \(--for\)"):
        sqlite_ledger.suppress_escalations([key], for_=period, by="ana", note="x")

    assert snapshot(sqlite_ledger) == before


def test_approving_a_suppressed_entity_is_refused(sqlite_ledger: ActionLedger) -> None:
    key = open_keys(sqlite_ledger, "vip_at_risk")[0]
    entity = str(
        sqlite_ledger.select_escalations(playbook=PLAYBOOK, keys=[key])["entity_id"].iloc[0]
    )
    # Suppressed directly (say, a do-not-contact request), which also closes the open escalation.
    [hold] = sqlite_ledger.suppress_entities(
        playbook=PLAYBOOK, entity_ids=[entity], for_="7d", by="dpo", note="asked not to be called"
    )
    assert hold.closed_escalations == (key,)
    before = snapshot(sqlite_ledger)

    with pytest.raises(EscalationError, match=r"not open \(it is suppressed by dpo"):
        sqlite_ledger.approve_escalations([key], by="ana")

    assert snapshot(sqlite_ledger) == before


def test_suppressing_entities_of_an_unknown_playbook_is_refused(
    sqlite_ledger: ActionLedger,
) -> None:
    before = snapshot(sqlite_ledger)
    with pytest.raises(EscalationError, match="never seen playbook 'churn_outreac'"):
        sqlite_ledger.suppress_entities(
            playbook="churn_outreac", entity_ids=["C000001"], for_="1d", by="ana", note="x"
        )
    with pytest.raises(EscalationError, match="needs a note"):
        sqlite_ledger.suppress_entities(
            playbook=PLAYBOOK, entity_ids=["C000001"], for_="1d", by="ana", note=""
        )
    assert snapshot(sqlite_ledger) == before


def test_a_lifted_suppression_ends_now_and_keeps_the_record(
    sqlite_ledger: ActionLedger, clock: Clock
) -> None:
    sqlite_ledger.suppress_entities(
        playbook=PLAYBOOK, entity_ids=["C000001", "C000002"], for_="2w", by="ana", note="x"
    )
    clock.advance(timedelta(hours=1))

    assert sqlite_ledger.lift_suppressions(playbook=PLAYBOOK, entity_ids=["C000001"], by="bob") == [
        "C000001"
    ]

    assert set(sqlite_ledger.active_suppressions(playbook=PLAYBOOK)) == {"C000002"}
    every = sqlite_ledger.suppressions(playbook=PLAYBOOK, active_only=False)
    lifted = every[every["entity_id"] == "C000001"].iloc[0]
    assert "lifted by bob via python" in lifted["note"]


def test_selection_by_partition_rule_and_expression(
    ledger: ActionLedger, recorder: Recorder
) -> None:
    execute_partition(ledger, "p2", channels=recorder.channels(), seed=8)
    queue = ledger.select_escalations(playbook=PLAYBOOK)
    data = pd.DataFrame([payload.loads(d) for d in queue["data"]])
    expected = queue[
        (queue["rule"] == "vip_at_risk").to_numpy() & (data["lifetime_value"] >= 8000).to_numpy()
    ]
    assert len(expected) > 1

    chosen = ledger.select_escalations(
        playbook=PLAYBOOK, rule="vip_at_risk", where="lifetime_value >= 8000"
    )
    assert set(chosen["idempotency_key"]) == set(expected["idempotency_key"])
    in_p2 = ledger.select_escalations(playbook=PLAYBOOK, partition_key="p2", rule="vip_at_risk")
    assert set(in_p2["partition_key"]) == {"p2"} and len(in_p2) > 0
    by_value = ledger.select_escalations(playbook=PLAYBOOK, sort="lifetime_value", descending=True)
    values = [payload.loads(d)["lifetime_value"] for d in by_value["data"]]
    assert values == sorted(values, reverse=True)
    newest = ledger.select_escalations(
        playbook=PLAYBOOK, sort="created_at", descending=True, limit=3
    )
    assert len(newest) == 3


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("lifetime_value >>= 8000", "does not parse"),
        ("__import__('os')", "does not parse|not allowed|uses Call"),
        ("wealth > 3", "reads column\\(s\\) 'wealth'"),
        ("", "is empty"),
    ],
)
def test_a_filter_that_cannot_be_used_is_refused(
    sqlite_ledger: ActionLedger, where: str, message: str
) -> None:
    with pytest.raises(EscalationError, match=message):
        sqlite_ledger.select_escalations(playbook=PLAYBOOK, where=where)


def test_sorting_by_an_unknown_column_is_refused(sqlite_ledger: ActionLedger) -> None:
    with pytest.raises(EscalationError, match="cannot sort by 'wealth': it is neither"):
        sqlite_ledger.select_escalations(playbook=PLAYBOOK, sort="wealth")


def test_due_batches_name_their_oldest_and_newest_approval(
    ledger: ActionLedger, clock: Clock, recorder: Recorder
) -> None:
    execute_partition(ledger, "p2", channels=recorder.channels(), seed=8)
    p1 = ledger.select_escalations(playbook=PLAYBOOK, partition_key="p1", rule="vip_at_risk")
    p2 = ledger.select_escalations(playbook=PLAYBOOK, partition_key="p2", rule="vip_at_risk")
    first = clock.now
    ledger.approve_escalations(list(p1["idempotency_key"][:2]), by="ana")
    clock.advance(timedelta(minutes=5))
    ledger.approve_escalations(
        [p1["idempotency_key"].iloc[2], p2["idempotency_key"].iloc[0]], by="bob"
    )

    batches = ledger.escalation_action_batches(playbook=PLAYBOOK)

    assert [(b.partition_key, b.count, b.oldest, b.newest) for b in batches] == [
        ("p1", 3, first, clock.now),
        ("p2", 1, clock.now, clock.now),
    ]
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == [("p1", 3), ("p2", 1)]
    # A live worker's claim is not due (its run delivers it); an expired one is.
    p2_action = approved_action_key(str(p2["idempotency_key"].iloc[0]))
    ledger.claim([p2_action], worker="live-worker", lease_seconds=600, run_id=None)
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == [("p1", 3)]
    ledger.heartbeat(worker="live-worker", lease_seconds=-1)
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == [("p1", 3), ("p2", 1)]
