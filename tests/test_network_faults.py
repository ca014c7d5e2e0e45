"""The delivery promise under network faults, through a real TCP fault proxy.

Path of every request: WebhookChannel (aiohttp) -> FaultProxy -> WebhookReceiver (aiohttp). For
each fault mode, and a mix of all of them, a plan is executed through the public API and then:

- every action ends succeeded, failed or escalated in the ledger, none reserved, sending or in
  doubt, and the run ends within a bounded time;
- every attempt for an entity carried the same key (``Idempotency-Key`` and ``webhook-id``), so a
  resend is recognisable as one;
- nothing is lost (every succeeded key reached the receiver), a deduping receiver counts each key
  once, and duplicates are bounded by the deliveries the client never saw acknowledged;
- the proxy really injected faults (a fault suite that injects nothing fails).
"""

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from autoexec_dagster import ActionLedger, WebhookChannel, execute_plan, route
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger import schema
from tests.delivery_worker import PARTITION, SECRET, insight, playbook
from tests.fault_proxy import (
    BURST,
    HANG,
    RESET,
    TRICKLE,
    UNACKNOWLEDGING,
    FaultPlan,
    FaultProxy,
    RequestRecord,
)
from tests.receivers import WebhookReceiver
from tests.reliability import record, trials

ACTIONS = trials(300, 3_000)
CONCURRENCY = 16
FINAL = {schema.SUCCEEDED, schema.FAILED, schema.ESCALATED}
STUCK = {schema.RESERVED, schema.SENDING, schema.IN_DOUBT}


@dataclass(frozen=True)
class Mode:
    """One fault mode: the proxy's plan and the channel's timeout that makes it bite."""

    name: str
    plan: FaultPlan
    timeout_seconds: float
    # Whether the mode makes the client retry; a trickle that ends inside the timeout does not.
    causes_resends: bool = True
    max_attempts: int = 10
    circuit_breaker_threshold: int = 20
    # Final states the mode must produce: a harsh mode proves the failure paths end too.
    must_reach: frozenset[str] = frozenset({schema.SUCCEEDED})
    # Fewest faults that prove the mode bit; None = one request in twenty.
    min_faults: int | None = None


MODES = {
    "reset": Mode("reset", FaultPlan(weights={RESET: 0.15}, seed=11), timeout_seconds=5.0),
    # The hang is only a fault because it outlasts the timeout: keep the timeout short.
    "hang": Mode("hang", FaultPlan(weights={HANG: 0.1}, seed=12), timeout_seconds=0.5),
    "trickle": Mode(
        "trickle",
        FaultPlan(weights={TRICKLE: 0.3}, seed=13, trickle_bytes=4, trickle_delay_seconds=0.005),
        # A generous timeout: a slow but complete answer must be taken, not resent.
        timeout_seconds=5.0,
        causes_resends=False,
    ),
    "burst": Mode(
        "burst", FaultPlan(weights={BURST: 0.04}, seed=14, burst_length=5), timeout_seconds=5.0
    ),
    "mixed": Mode(
        "mixed",
        FaultPlan(
            weights={RESET: 0.05, HANG: 0.04, TRICKLE: 0.05, BURST: 0.02},
            seed=15,
            burst_length=4,
            trickle_bytes=16,
            trickle_delay_seconds=0.002,
        ),
        timeout_seconds=1.0,
    ),
    # Faults drawn per connection: a faulted connection's requests all suffer it (a trickle
    # slows every answer on it; a reset or hang ends it, and its retry opens a fresh one).
    "per_connection": Mode(
        "per_connection",
        FaultPlan(
            weights={RESET: 0.3, HANG: 0.2, TRICKLE: 0.2},
            seed=16,
            scope="connection",
            trickle_bytes=16,
            trickle_delay_seconds=0.002,
        ),
        timeout_seconds=1.0,
        # Only new connections draw a fault, and the pool opens few: a handful proves the mode.
        min_faults=10,
    ),
}
# Destinations that do not heal in time: actions must still end, as failed or escalated.
HARSH = {
    # A 5xx outage longer than the breaker's threshold: the rest of the batch is escalated.
    "outage": Mode(
        "outage",
        FaultPlan(weights={BURST: 0.02}, seed=21, burst_length=60, budget=60),
        timeout_seconds=5.0,
        circuit_breaker_threshold=10,
        must_reach=frozenset({schema.ESCALATED}),
        # Once open, the breaker sends nothing more: the faults are the ones that opened it.
        min_faults=10,
    ),
    # Requests hang before reaching the receiver and only two attempts are allowed: some
    # actions fail for good, and none of those may have been delivered.
    "exhausted": Mode(
        "exhausted",
        FaultPlan(weights={HANG: 0.3}, seed=22, hang_forwards=False),
        timeout_seconds=0.4,
        max_attempts=2,
        circuit_breaker_threshold=1_000,
        must_reach=frozenset({schema.SUCCEEDED, schema.FAILED}),
    ),
}


def _deadline(mode: Mode) -> float:
    # Worst case per action: every attempt waits out the timeout; faults are a minority of
    # requests, so a few dozen waves of timeouts over the concurrency is ample.
    return 30.0 + ACTIONS / CONCURRENCY * mode.timeout_seconds


def _channel(url: str, mode: Mode) -> WebhookChannel:
    return WebhookChannel(
        url=url,
        secret=SECRET,
        allowed_hosts=["127.0.0.1"],
        max_concurrency=CONCURRENCY,
        max_attempts=mode.max_attempts,
        circuit_breaker_threshold=mode.circuit_breaker_threshold,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.1,
        timeout_seconds=mode.timeout_seconds,
    )


def _execute_bounded(run: Callable[[], ExecutionReport], deadline: float) -> ExecutionReport:
    """Run an execution in a daemon thread; fail (not hang) when it outlasts the deadline."""
    result: list[ExecutionReport] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(run())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="execute_plan", daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        pytest.fail(f"execute_plan did not finish within {deadline:.0f} s (hung)")
    if errors:
        raise errors[0]
    return result[0]


def _check_keys_travel(attempts: dict[str, list[RequestRecord]], expected: dict[str, str]) -> int:
    """Every attempt of an entity carried its key in both headers; returns the resent entities."""
    assert set(attempts) <= set(expected), "the proxy saw requests for entities not in the plan"
    resent = 0
    for entity, records in attempts.items():
        keys = {r.idempotency_key for r in records}
        ids = {r.webhook_id for r in records}
        assert keys == ids == {expected[entity]}, f"entity {entity}: keys {keys}, ids {ids}"
        if len(records) > 1:
            resent += 1
    return resent


def _run_mode(mode: Mode, tmp_path, *, dedupe: bool) -> None:
    book = playbook()
    plan = route(insight(ACTIONS), book, partition_key=PARTITION)
    expected = dict(zip(plan["entity_id"].astype(str), plan["idempotency_key"], strict=True))
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = ActionLedger(ledger_url)
    with (
        WebhookReceiver(secret=SECRET, dedupe=dedupe) as receiver,
        FaultProxy(receiver.port, mode.plan) as proxy,
    ):
        channel = _channel(proxy.url, mode)
        deadline = _deadline(mode)
        started = time.perf_counter()
        report = _execute_bounded(
            lambda: execute_plan(
                plan,
                playbook=book,
                ledger=ActionLedger(ledger_url),
                channels={"crm_task": channel},
                partition_key=PARTITION,
            ),
            deadline,
        )
        wall = time.perf_counter() - started
        injected = proxy.injected
        attempts = proxy.attempts_by_entity()
        records = proxy.records
        unacknowledged = proxy.unacknowledged_deliveries()
        deliveries = receiver.deliveries
        repeated = receiver.duplicates

    rows = ledger.actions(states=None).set_index("idempotency_key")["state"]
    states = Counter(rows.tolist())
    stuck = sum(states[s] for s in STUCK)
    succeeded = set(rows.index[rows == schema.SUCCEEDED])
    lost = len(succeeded - set(deliveries)) + (len(expected) - len(rows))
    accepted = sum(1 for r in records if r.forwarded and 200 <= r.upstream_status < 300)
    duplicates = repeated if dedupe else sum(n - 1 for n in deliveries.values())
    resent = _check_keys_travel(attempts, expected)
    record(
        "network_faults",
        mode=mode.name,
        receiver="dedupe" if dedupe else "plain",
        actions=ACTIONS,
        requests=len(records),
        faults=sum(injected.values()),
        injected=dict(injected),
        unacknowledged=unacknowledged,
        resent_entities=resent,
        succeeded=states[schema.SUCCEEDED],
        failed=states[schema.FAILED],
        escalated=states[schema.ESCALATED],
        lost=lost,
        duplicates=duplicates,
        stuck=stuck,
        wall_seconds=round(wall, 2),
    )

    # The fault was really injected, and as often as the plan's weights make certain.
    faults = sum(injected.values())
    least = ACTIONS // 20 if mode.min_faults is None else mode.min_faults
    assert faults >= least, f"only {faults} faults injected: {dict(injected)}"
    for name in mode.plan.weights:
        assert injected[name] > 0, f"{name} never injected: {dict(injected)}"

    # Every action ended; none is stuck.
    assert len(rows) == len(expected)
    assert stuck == 0, f"stuck actions: {dict(states)}"
    assert set(states) <= FINAL, dict(states)
    for state in mode.must_reach:
        assert states[state] > 0, f"no action ended {state}: {dict(states)}"
    assert report.succeeded == states[schema.SUCCEEDED]
    assert report.failed == states[schema.FAILED]
    assert wall < deadline

    # Nothing lost: every action the ledger calls delivered reached the receiver; and one the
    # ledger does not call delivered reached it only through a swallowed acknowledgement.
    assert lost == 0
    swallowed = {
        r.idempotency_key
        for r in records
        if r.forwarded and 200 <= r.upstream_status < 300 and not r.acknowledged
    }
    assert set(deliveries) - succeeded <= swallowed
    # A resend carries the same key: checked per entity above; here that resends happened.
    if mode.causes_resends:
        assert resent > 0, "no entity was attempted twice: the faults caused no resend"
    else:
        trickled = [r for r in records if r.fault == TRICKLE]
        assert trickled and all(r.acknowledged for r in trickled)
        assert resent == 0 and duplicates == 0

    # What reached the receiver: one delivery per key where it dedupes, and the repeats are only
    # deliveries whose acknowledgement the fault swallowed.
    assert accepted == sum(deliveries.values()) + repeated
    if dedupe:
        assert set(deliveries.values()) <= {1}
    assert duplicates <= unacknowledged
    swallowing = set(mode.plan.weights) & UNACKNOWLEDGING
    if not mode.plan.hang_forwards:
        swallowing.discard(HANG)
    if swallowing:
        assert unacknowledged > 0, "no delivered-but-unacknowledged request was produced"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(MODES))
def test_every_action_ends_under_network_faults_at_a_deduping_receiver(name: str, tmp_path):
    _run_mode(MODES[name], tmp_path, dedupe=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(HARSH))
def test_actions_end_failed_or_escalated_when_the_destination_does_not_heal(name: str, tmp_path):
    _run_mode(HARSH[name], tmp_path, dedupe=True)


@pytest.mark.timeout(300)
def test_mixed_faults_at_a_plain_receiver_bound_duplicates_by_unacknowledged_deliveries(tmp_path):
    _run_mode(MODES["mixed"], tmp_path, dedupe=False)


@pytest.mark.timeout(60)
def test_the_proxy_injects_nothing_without_a_plan(tmp_path):
    # The control: the same path without faults delivers each action once on the first attempt.
    mode = Mode("none", FaultPlan(), timeout_seconds=5.0, causes_resends=False)
    book = playbook()
    plan = route(insight(50), book, partition_key=PARTITION)
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    with WebhookReceiver(secret=SECRET) as receiver, FaultProxy(receiver.port) as proxy:
        report = _execute_bounded(
            lambda: execute_plan(
                plan,
                playbook=book,
                ledger=ledger,
                channels={"crm_task": _channel(proxy.url, mode)},
                partition_key=PARTITION,
            ),
            _deadline(mode),
        )
        assert proxy.faults == 0 and len(proxy.records) == 50
        assert report.succeeded == 50 and report.retries == 0
        assert receiver.unique_keys == set(plan["idempotency_key"])
        assert all(r.acknowledged for r in proxy.records)
