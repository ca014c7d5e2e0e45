"""The escalation queue as a work queue (issue 8), end to end on real ledgers and receivers.

Done when: an escalated churn customer's proposed action, approved by a person, is executed once,
and a second approval does nothing. Also: a crash between the decision and the delivery loses
nothing and sends nothing twice; a decision arriving while a delivery run is moving is delivered
by the next run; suppression stops both the action and a new escalation for the period, then
expires; bulk decisions by expression and by rule.
"""

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from autoexec_dagster import EmailChannel, PythonChannel, WebhookChannel
from autoexec_dagster.channels.base import ActionRequest, Channel
from autoexec_dagster.executor.escalation_actions import deliver_approved_escalations
from autoexec_dagster.ledger import payload
from autoexec_dagster.ledger.action_ledger import ActionLedger, new_worker_id
from autoexec_dagster.ledger.escalations import EscalationError, approved_action_key
from autoexec_dagster.ledger.suppressions import SUPPRESSED_DETAIL
from tests.receivers import SmtpSink, WebhookReceiver
from tests.test_ledger_escalations import (
    PLAYBOOK,
    Clock,
    Recorder,
    execute_partition,
    open_keys,
    proposing_playbook,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def webhook(receiver: WebhookReceiver, **overrides: object) -> WebhookChannel:
    fields: dict[str, object] = {
        "url": receiver.url,
        "secret": SECRET,
        "allowed_hosts": ["127.0.0.1"],
        "max_concurrency": 8,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.1,
        **overrides,
    }
    return WebhookChannel(**fields)  # type: ignore[arg-type]


def email(sink: SmtpSink) -> EmailChannel:
    return EmailChannel(
        host="127.0.0.1",
        port=sink.port,
        sender="care@example.com",
        to_column="email",
        subject="We miss you, {{ name }}",
        template="Hi {{ name }}, here is 20% off your next month.",
        max_concurrency=8,
    )


@pytest.fixture
def receivers() -> Iterator[tuple[SmtpSink, WebhookReceiver]]:
    with SmtpSink() as sink, WebhookReceiver(secret=SECRET) as crm:
        yield sink, crm


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def test_an_approved_proposal_is_executed_once_and_a_second_approval_does_nothing(
    url: str, receivers: tuple[SmtpSink, WebhookReceiver]
) -> None:
    sink, crm = receivers
    ledger = ActionLedger(url)
    channels: dict[str, Channel] = {"retention_email": email(sink), "crm_task": webhook(crm)}
    playbook = proposing_playbook()
    report = execute_partition(ledger, "p1", channels=channels)
    routed_tasks = crm.unique_keys
    assert report.escalated > 0 and len(routed_tasks) == report.by_action["crm_task"]["succeeded"]
    queue = ledger.select_escalations(playbook=PLAYBOOK, rule="vip_at_risk")
    key, customer = str(queue["idempotency_key"].iloc[0]), str(queue["entity_id"].iloc[0])

    (decision,) = ledger.approve_escalations([key], by="ana", note="call booked", via="cli")
    # Nothing is sent by the decision itself: the outbox holds it until a run delivers it.
    assert crm.unique_keys == routed_tasks
    delivered = deliver_approved_escalations(
        playbook=playbook, ledger=ledger, channels=channels, partition_key="p1"
    )

    assert delivered.succeeded == 1 and delivered.failed == 0
    assert crm.unique_keys - routed_tasks == {decision.action_key}
    assert crm.deliveries[approved_action_key(key)] == 1
    body = crm.payloads[approved_action_key(key)]
    assert body["entity_id"] == customer and body["action"] == "crm_task"
    assert body["rule"] == "vip_at_risk" and body["partition_key"] == "p1"
    action_key = approved_action_key(key)
    assert decision.action_key == action_key
    assert crm.request_headers[action_key]["idempotency-key"] == action_key
    assert ledger.approved_action_states([key]) == {key: "succeeded"}
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == []

    with pytest.raises(EscalationError, match="not open"):
        ledger.approve_escalations([key], by="bob")
    again = deliver_approved_escalations(playbook=playbook, ledger=ledger, channels=channels)
    rerun = execute_partition(ledger, "p1", channels=channels)

    assert again.succeeded == 0 and rerun.succeeded == 0
    assert crm.requests == len(routed_tasks) + 1
    assert crm.deliveries[action_key] == 1


def test_a_crash_between_decision_and_delivery_delivers_exactly_once(
    url: str, receivers: tuple[SmtpSink, WebhookReceiver]
) -> None:
    sink, crm = receivers
    channels: dict[str, Channel] = {"retention_email": email(sink), "crm_task": webhook(crm)}
    deciding = ActionLedger(url)
    execute_partition(deciding, "p1", channels=channels)
    first, second = open_keys(deciding, "vip_at_risk")[:2]
    deciding.approve_escalations([first, second], by="ana")
    # The process that decided dies before any delivery; a worker that claimed the second
    # action dies too, before sending it (its lease has run out).
    deciding.claim(
        [approved_action_key(second)], worker=new_worker_id(), lease_seconds=-1, run_id="dead"
    )
    deciding.dispose()
    before = crm.requests

    fresh = ActionLedger(url)
    assert fresh.escalation_actions_due(playbook=PLAYBOOK) == [("p1", 2)]
    report = deliver_approved_escalations(
        playbook=proposing_playbook(), ledger=fresh, channels=channels
    )

    assert report.succeeded == 2 and report.in_doubt_recovered == 1
    assert crm.requests - before == 2
    assert crm.deliveries[approved_action_key(first)] == 1
    assert crm.deliveries[approved_action_key(second)] == 1
    assert fresh.escalation_actions_due(playbook=PLAYBOOK) == []
    assert (
        deliver_approved_escalations(
            playbook=proposing_playbook(), ledger=ActionLedger(url), channels=channels
        ).succeeded
        == 0
    )
    assert crm.requests - before == 2


def test_an_at_most_once_proposal_in_doubt_goes_back_to_a_person(url: str) -> None:
    recorder = Recorder()
    channels: dict[str, Channel] = {
        "retention_email": PythonChannel.from_callable(recorder),
        "crm_task": PythonChannel.from_callable(recorder, delivery="at_most_once"),
    }
    ledger = ActionLedger(url)
    execute_partition(ledger, "p1", channels=channels)
    key = open_keys(ledger, "vip_at_risk")[0]
    ledger.approve_escalations([key], by="ana")
    ledger.set_delivery_mode([approved_action_key(key)], delivery="at_most_once")
    # A worker claimed it and died: it may or may not have been sent.
    ledger.claim([approved_action_key(key)], worker=new_worker_id(), lease_seconds=-1, run_id=None)
    sent_before = len(recorder.keys)

    report = deliver_approved_escalations(
        playbook=proposing_playbook(), ledger=ledger, channels=channels
    )

    assert report.succeeded == 0 and report.escalated == 1
    assert len(recorder.keys) == sent_before
    reconcile = ledger.select_escalations(playbook=PLAYBOOK, keys=[approved_action_key(key)])
    assert list(reconcile["kind"]) == ["in_doubt"]
    assert list(reconcile["partition_key"]) == ["p1"] and list(reconcile["rule"]) == ["vip_at_risk"]


def test_a_decision_arriving_while_a_delivery_runs_is_delivered_by_the_next_run(
    url: str,
) -> None:
    ledger = ActionLedger(url)
    recorder = Recorder()
    execute_partition(ledger, "p1", channels=recorder.channels())
    first, late = open_keys(ledger, "vip_at_risk")[:2]
    ledger.approve_escalations([first], by="ana")
    other_desk = ActionLedger(url)
    decided = threading.Event()

    def send_and_meanwhile_approve(request: ActionRequest) -> str:
        # While this run delivers, a colleague approves another escalation.
        if not decided.is_set():
            other_desk.approve_escalations([late], by="bob", via="link")
            decided.set()
        return recorder(request)

    channels: dict[str, Channel] = {
        **recorder.channels(),
        "crm_task": PythonChannel.from_callable(send_and_meanwhile_approve),
    }
    before = len(recorder.keys)
    moving = deliver_approved_escalations(
        playbook=proposing_playbook(), ledger=ledger, channels=channels
    )

    assert decided.is_set() and moving.succeeded == 1
    assert recorder.keys[before:] == [("crm_task", approved_action_key(first))]
    assert ledger.escalation_actions_due(playbook=PLAYBOOK) == [("p1", 1)]
    following = deliver_approved_escalations(
        playbook=proposing_playbook(), ledger=ledger, channels=channels
    )
    assert following.succeeded == 1
    assert recorder.keys[before:] == [
        ("crm_task", approved_action_key(first)),
        ("crm_task", approved_action_key(late)),
    ]


def test_two_runs_delivering_at_once_send_each_approval_once(
    url: str, receivers: tuple[SmtpSink, WebhookReceiver]
) -> None:
    sink, crm = receivers
    channels: dict[str, Channel] = {"retention_email": email(sink), "crm_task": webhook(crm)}
    ledger = ActionLedger(url)
    execute_partition(ledger, "p1", n=1_000, channels=channels)
    keys = open_keys(ledger, "vip_at_risk")
    assert len(keys) >= 10
    ledger.approve_escalations(keys, by="ana")
    before = crm.requests
    reports: list[int] = []
    barrier = threading.Barrier(2)

    def deliver() -> None:
        barrier.wait()
        report = deliver_approved_escalations(
            playbook=proposing_playbook(), ledger=ActionLedger(url), channels=channels
        )
        reports.append(report.succeeded)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert sum(reports) == len(keys)
    assert crm.requests - before == len(keys)
    assert {crm.deliveries[approved_action_key(k)] for k in keys} == {1}


def test_suppression_stops_action_and_escalation_for_the_period_then_expires(url: str) -> None:
    clock = Clock()
    ledger = ActionLedger(url, clock=clock)
    recorder = Recorder()
    channels = recorder.channels()
    first = execute_partition(ledger, "p1", channels=channels)
    assert first.succeeded > 0
    queue = ledger.select_escalations(playbook=PLAYBOOK, rule="vip_at_risk")
    escalated_key, escalated = (
        str(queue["idempotency_key"].iloc[0]),
        str(queue["entity_id"].iloc[0]),
    )
    actions = ledger.actions(playbook=PLAYBOOK, partition_key="p1")
    emailed = str(
        actions.loc[
            actions["action"].eq("retention_email") & actions["decision"].eq("act"), "entity_id"
        ]
        .sort_values()
        .iloc[0]
    )
    (decision,) = ledger.suppress_escalations(
        [escalated_key], for_="30d", by="ana", note="on a sabbatical", via="cli"
    )
    ledger.suppress_entities(
        playbook=PLAYBOOK, entity_ids=[emailed], for_="30d", by="dpo", note="asked for no email"
    )
    until = decision.suppressed_until
    assert until is not None

    clock.advance(timedelta(days=1))
    during = execute_partition(ledger, "p2", channels=channels)

    rows = ledger.actions(playbook=PLAYBOOK, partition_key="p2").set_index("entity_id")
    for entity, who in ((escalated, "ana"), (emailed, "dpo")):
        assert rows.loc[entity, "state"] == "skipped"
        assert rows.loc[entity, "detail"] == (
            f"{SUPPRESSED_DETAIL} by {who} until {until:%Y-%m-%d %H:%M} UTC"
        )
    assert (
        ledger.select_escalations(playbook=PLAYBOOK, partition_key="p2")
        .query("entity_id == @escalated")
        .empty
    )
    sent_p2 = {key for _, key in recorder.keys} & set(rows["idempotency_key"])
    assert rows.loc[emailed, "idempotency_key"] not in sent_p2
    assert during.succeeded == len(sent_p2) > 0  # everyone else was acted on as usual
    assert during.by_action["retention_email"]["suppressed"] == 1

    clock.advance(timedelta(days=30))
    after = execute_partition(ledger, "p3", channels=channels)

    rows = ledger.actions(playbook=PLAYBOOK, partition_key="p3").set_index("entity_id")
    assert rows.loc[emailed, "state"] == "succeeded"
    assert rows.loc[escalated, "state"] == "escalated"
    reopened = ledger.select_escalations(playbook=PLAYBOOK, partition_key="p3")
    assert escalated in set(reopened["entity_id"])
    assert "suppressed" not in after.by_action.get("retention_email", {})


def test_a_suppression_also_stops_an_action_an_earlier_run_left_unsent(url: str) -> None:
    ledger = ActionLedger(url)
    recorder = Recorder()

    def pause_on_first(request: ActionRequest) -> str:
        ledger.pause(PLAYBOOK, reason="CRM maintenance", by="ops")
        return recorder(request)

    interrupted = execute_partition(
        ledger,
        "p1",
        channels={
            "retention_email": PythonChannel.from_callable(pause_on_first, max_concurrency=1),
            "crm_task": PythonChannel.from_callable(pause_on_first, max_concurrency=1),
        },
    )
    assert interrupted.pending > 0
    pending = ledger.actions(playbook=PLAYBOOK, states=["reserved"])
    entity, key = str(pending["entity_id"].iloc[0]), str(pending["idempotency_key"].iloc[0])
    ledger.suppress_entities(playbook=PLAYBOOK, entity_ids=[entity], for_="7d", by="ana", note="x")
    ledger.resume(PLAYBOOK, by="ops")

    resumed = execute_partition(ledger, "p1", channels=recorder.channels())

    assert key not in {k for _, k in recorder.keys}
    assert resumed.succeeded == len(pending) - 1
    [row] = ledger.actions(playbook=PLAYBOOK).query("idempotency_key == @key").to_dict("records")
    assert row["state"] == "skipped" and str(row["detail"]).startswith(SUPPRESSED_DETAIL)
    assert ledger.partitions_with_pending_work(playbook=PLAYBOOK) == []


def test_bulk_approval_by_expression_and_by_rule(
    url: str, receivers: tuple[SmtpSink, WebhookReceiver]
) -> None:
    sink, crm = receivers
    channels: dict[str, Channel] = {"retention_email": email(sink), "crm_task": webhook(crm)}
    ledger = ActionLedger(url)
    execute_partition(ledger, "p1", n=600, channels=channels)
    execute_partition(ledger, "p2", n=600, seed=9, channels=channels)
    queue = ledger.select_escalations(playbook=PLAYBOOK)
    values = {
        str(k): payload.loads(d)["lifetime_value"]
        for k, d in zip(queue["idempotency_key"], queue["data"], strict=True)
    }
    rich = {
        str(k)
        for k, rule in zip(queue["idempotency_key"], queue["rule"], strict=True)
        if rule == "vip_at_risk" and values[str(k)] >= 8000
    }
    assert len(rich) >= 2

    by_expression = ledger.select_escalations(
        playbook=PLAYBOOK, rule="vip_at_risk", where="lifetime_value >= 8000"
    )
    approved = ledger.approve_escalations(by_expression["idempotency_key"], by="ana", via="cli")
    unsure = ledger.select_escalations(playbook=PLAYBOOK, rule="unsure")
    rejected = ledger.reject_escalations(
        unsure["idempotency_key"], by="ana", note="the model is being retrained"
    )
    before = crm.requests
    report = deliver_approved_escalations(
        playbook=proposing_playbook(), ledger=ledger, channels=channels
    )

    assert {d.key for d in approved} == rich
    assert {d.status for d in rejected} == {"rejected"} and len(rejected) == len(unsure)
    assert report.succeeded == len(rich) and crm.requests - before == len(rich)
    assert {crm.deliveries[approved_action_key(k)] for k in rich} == {1}
    left = ledger.select_escalations(playbook=PLAYBOOK)
    assert set(left["rule"]) == {"vip_at_risk"} and not set(left["idempotency_key"]) & rich
