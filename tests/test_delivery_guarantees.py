"""The delivery promises, against real servers and real worker processes.

- every act row is delivered once over real SMTP and HTTP; a re-run delivers nothing;
- a destination failing 20% of requests and answering 429 with Retry-After still ends with every
  action succeeded or escalated, and no key accepted twice;
- a worker killed with SIGKILL mid-batch and restarted loses nothing, and the duplicates the
  receiver sees are bounded by the in-flight window;
- two processes executing the same plan at once, their deliveries interleaved (a start barrier at
  the receiver holds the first until the second has sent too), deliver each action exactly once
  (SQLite and PostgreSQL).
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

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
    ledger_url: str,
    webhook_url: str,
    entities: int,
    concurrency: int,
    *extra: str,
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
            *extra,
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
        # The in-flight window at the kill, measured: claimed and never completed.
        in_flight = states.get(schema.SENDING, 0)
        assert states.get(schema.SUCCEEDED, 0) < entities, "the kill came too late to test anything"
        assert 0 < in_flight < entities - states.get(schema.SUCCEEDED, 0), (
            "the claims should run a bounded window ahead of the sends, not the whole batch"
        )

        restarted = _report(_start_worker(ledger_url, receiver.url, entities, concurrency))
        assert restarted["in_doubt_recovered"] == in_flight
        final = ledger.state_counts()
        assert final == {schema.SUCCEEDED: entities}
        # Nothing lost: the receiver saw every key.
        assert receiver.unique_keys == keys
        # Duplicates: only actions that were in flight at the kill can arrive twice.
        duplicates = sum(n - 1 for n in receiver.deliveries.values())
        assert duplicates <= in_flight


class _AttributingReceiver(WebhookReceiver):
    """Records which worker delivered each key, in answer order, behind a start barrier.

    Each worker sends an ``X-Worker`` header. No request is answered before every expected
    worker has sent one (or ``barrier_seconds`` passed): whichever process starts first cannot
    finish the batch alone, so the test exercises two workers claiming from one ledger at once.
    """

    def __init__(self, *, workers: set[str], barrier_seconds: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.expected = frozenset(workers)
        self.barrier_seconds = barrier_seconds
        self._arrived: set[str] = set()
        self._everyone = asyncio.Event()
        self._order: list[tuple[str, str]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        worker = request.headers.get("X-Worker", "")
        self._arrived.add(worker)
        if self._arrived >= self.expected:
            self._everyone.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._everyone.wait(), self.barrier_seconds)
        response = await super()._handle(request)
        if response.status == 200:
            with self._lock:
                self._order.append((worker, request.headers.get("Idempotency-Key", "")))
        return response

    @property
    def order(self) -> list[tuple[str, str]]:
        """(worker, key) of every accepted delivery, in the order they were answered."""
        with self._lock:
            return list(self._order)


def _two_workers_deliver_once(ledger_url: str) -> None:
    entities = 3_000
    ActionLedger(ledger_url)  # create the schema once, as a deployment would
    receiver = _AttributingReceiver(
        workers={"A", "B"}, barrier_seconds=60, secret=SECRET, latency_seconds=0.002
    )
    with receiver:
        # A per-request timeout beyond the barrier: the first worker's requests wait for the other.
        first = _start_worker(
            ledger_url, receiver.url, entities, 20, "--name", "A", "--timeout", "90"
        )
        second = _start_worker(
            ledger_url, receiver.url, entities, 20, "--name", "B", "--timeout", "90"
        )
        reports = [_report(first), _report(second)]
        order = receiver.order
        assert receiver.unique_keys == set(plan_keys(entities))
        assert set(receiver.deliveries.values()) == {1}
        assert len(order) == entities
        assert sum(r["succeeded"] for r in reports) == entities
        by = {name: [i for i, (w, _) in enumerate(order) if w == name] for name in ("A", "B")}
        keys_by = {name: {k for w, k in order if w == name} for name in ("A", "B")}
        assert not keys_by["A"] & keys_by["B"], "an action was delivered by both workers"
        assert [len(keys_by["A"]), len(keys_by["B"])] == [r["succeeded"] for r in reports]
        # They overlapped: each delivered part of the batch while the other was still delivering.
        assert by["A"] and by["B"], f"one worker delivered nothing: {len(by['A'])}, {len(by['B'])}"
        assert by["A"][0] < by["B"][-1] and by["B"][0] < by["A"][-1], (
            f"A delivered #{by['A'][0]}..#{by['A'][-1]}, B #{by['B'][0]}..#{by['B'][-1]}: "
            "one ran after the other"
        )
        overlap = range(max(by["A"][0], by["B"][0]), min(by["A"][-1], by["B"][-1]) + 1)
        inside = {w for w, _ in (order[i] for i in overlap)}
        assert inside == {"A", "B"}


@pytest.mark.slow
def test_two_processes_on_sqlite_deliver_each_action_once(tmp_path):
    _two_workers_deliver_once(f"sqlite:///{tmp_path / 'ledger.db'}")


@pytest.mark.slow
@pytest.mark.postgres
def test_two_processes_on_postgres_deliver_each_action_once(postgres_url):
    _two_workers_deliver_once(postgres_url)
