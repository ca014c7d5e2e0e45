"""The delivery promises, against real servers and real worker processes.

- every act row is delivered once over real SMTP and HTTP; a re-run delivers nothing;
- a destination failing 20% of requests and answering 429 with Retry-After still ends with every
  action succeeded or escalated, and no key accepted twice;
- a worker killed with SIGKILL mid-batch and restarted loses nothing, and the duplicates the
  receiver sees are bounded by the in-flight window;
- two processes executing the same plan at once deliver each action once (SQLite and PostgreSQL).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from autoexec_dagster import (
    ActionLedger,
    EmailChannel,
    WebhookChannel,
    execute_plan,
    route,
)
from autoexec_dagster.ledger import schema
from tests.conftest import churn_playbook, churn_scores
from tests.delivery_worker import SECRET, plan_keys
from tests.receivers import SmtpSink, WebhookReceiver

DAY = "2026-11-24"
ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, "-m", "tests.delivery_worker"]


def _email(sink: SmtpSink) -> EmailChannel:
    return EmailChannel(
        host="127.0.0.1",
        port=sink.port,
        sender="care@example.com",
        to_column="email",
        subject="We miss you, {{ name }}",
        template="Hi {{ name }}, here is 20% off your next month.",
        max_concurrency=8,
    )


def _webhook(receiver: WebhookReceiver, **overrides: object) -> WebhookChannel:
    params: dict[str, object] = {
        "url": receiver.url,
        "secret": SECRET,
        "allowed_hosts": ["127.0.0.1"],
        "max_concurrency": 16,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.2,
        **overrides,
    }
    return WebhookChannel(**params)  # type: ignore[arg-type]


def test_real_smtp_and_webhook_deliver_each_action_once(ledger_url):
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(600), playbook, partition_key=DAY)
    ledger = ActionLedger(ledger_url)
    emails = set(plan.loc[plan["action"] == "retention_email", "idempotency_key"])
    tasks = set(plan.loc[plan["action"] == "crm_task", "idempotency_key"])
    with SmtpSink() as sink, WebhookReceiver(secret=SECRET) as receiver:
        channels = {"retention_email": _email(sink), "crm_task": _webhook(receiver)}
        report = execute_plan(
            plan, playbook=playbook, ledger=ledger, channels=channels, partition_key=DAY
        )
        assert report.succeeded == len(emails) + len(tasks)
        assert receiver.unique_keys == tasks and set(receiver.deliveries.values()) == {1}
        received = sink.messages
        assert len(received) == len(emails)
        message_ids = {m.message["Message-ID"] for m in received}
        assert len(message_ids) == len(emails)
        assert all(any(k in mid for k in emails) for mid in message_ids)
        again = execute_plan(
            plan, playbook=playbook, ledger=ledger, channels=channels, partition_key=DAY
        )
        assert again.already_done == len(plan) and again.succeeded == 0
        assert len(sink.messages) == len(emails) and receiver.requests == len(tasks)


def test_a_flaky_rate_limiting_destination_loses_nothing_and_sees_no_key_twice(sqlite_url):
    playbook = churn_playbook(max_flagged_fraction=0.9)
    plan = route(churn_scores(3_000), playbook, partition_key=DAY)
    ledger = ActionLedger(sqlite_url)
    acting = plan[plan["decision"] == "act"]
    with (
        SmtpSink() as sink,
        WebhookReceiver(
            secret=SECRET, fail_rate=0.2, rate_limit_every=7, retry_after="0.05", seed=3
        ) as receiver,
    ):
        channels = {"retention_email": _email(sink), "crm_task": _webhook(receiver, max_attempts=8)}
        report = execute_plan(
            plan, playbook=playbook, ledger=ledger, channels=channels, partition_key=DAY
        )
        assert receiver.statuses[500] > 0 and receiver.statuses[429] > 0
        # Every refused attempt is either retried or ends its action as failed (and escalated).
        assert report.retries + report.failed == receiver.statuses[500] + receiver.statuses[429]
        tasks = set(acting.loc[acting["action"] == "crm_task", "idempotency_key"])
        assert max(receiver.deliveries.values()) == 1
        states = ledger.actions(states=None).set_index("idempotency_key")["state"]
        escalated = set(ledger.escalations()["idempotency_key"])
        for key in acting["idempotency_key"]:
            assert states[key] == schema.SUCCEEDED or key in escalated
        delivered = {k for k in tasks if states[k] == schema.SUCCEEDED}
        assert receiver.unique_keys == delivered


def _start_worker(
    ledger_url: str, webhook_url: str, entities: int, concurrency: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *WORKER,
            "--ledger",
            ledger_url,
            "--webhook",
            webhook_url,
            "--entities",
            str(entities),
            "--concurrency",
            str(concurrency),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _report(process: subprocess.Popen[str]) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_nothing_and_duplicates_stay_in_the_window(tmp_path):
    entities, concurrency = 10_000, 50
    window = 2 * concurrency  # the executor's in-flight window per channel
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    keys = set(plan_keys(entities))
    with WebhookReceiver(secret=SECRET, latency_seconds=0.005) as receiver:
        worker = _start_worker(ledger_url, receiver.url, entities, concurrency)
        try:
            assert receiver.wait_for_requests(3_000, timeout=120), "the worker never got going"
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert worker.returncode == -signal.SIGKILL
        ledger = ActionLedger(ledger_url)
        states = ledger.state_counts()
        in_flight = states.get(schema.SENDING, 0)
        assert states.get(schema.SUCCEEDED, 0) < entities, "the kill came too late to test anything"
        assert in_flight <= window

        restarted = _report(_start_worker(ledger_url, receiver.url, entities, concurrency))
        assert restarted["in_doubt_recovered"] == in_flight
        final = ledger.state_counts()
        assert final == {schema.SUCCEEDED: entities}
        # Nothing lost: the receiver saw every key.
        assert receiver.unique_keys == keys
        # Duplicates: only actions that were in flight at the kill can arrive twice.
        duplicates = sum(n - 1 for n in receiver.deliveries.values())
        assert duplicates <= in_flight <= window


def _two_workers_deliver_once(ledger_url: str) -> None:
    entities = 3_000
    ActionLedger(ledger_url)  # create the schema once, as a deployment would
    with WebhookReceiver(secret=SECRET, latency_seconds=0.002) as receiver:
        first = _start_worker(ledger_url, receiver.url, entities, 20)
        second = _start_worker(ledger_url, receiver.url, entities, 20)
        reports = [_report(first), _report(second)]
        assert receiver.unique_keys == set(plan_keys(entities))
        assert set(receiver.deliveries.values()) == {1}
        assert sum(r["succeeded"] for r in reports) == entities
        # Both really worked: each delivered a share, neither ran alone.
        assert all(r["succeeded"] + r["already_done"] + r["claimed_elsewhere"] > 0 for r in reports)


@pytest.mark.slow
def test_two_processes_on_sqlite_deliver_each_action_once(tmp_path):
    _two_workers_deliver_once(f"sqlite:///{tmp_path / 'ledger.db'}")


@pytest.mark.slow
@pytest.mark.postgres
def test_two_processes_on_postgres_deliver_each_action_once(postgres_url):
    _two_workers_deliver_once(postgres_url)
