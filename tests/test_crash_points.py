"""Kills at named points: a worker SIGKILLed anywhere in reserve -> claim -> send -> complete
loses nothing when restarted, and resends at most what was in flight when it died.

Each trial forks a real worker process (tests/crash_worker.py) that executes N webhook actions
and SIGKILLs itself on the k-th pass through one point:

- ``after_reserve``: ActionLedger.reserve returned;
- ``after_claim``: a claim returned (claimed, nothing of it sent);
- ``after_send``: the receiver answered a request, before its outcome is buffered;
- ``before_complete``: ActionLedger.complete was entered, before it writes;
- ``during_flush``: inside complete's transaction, its UPDATE executed, COMMIT not yet.

k is drawn per trial from a seeded generator (printed) over the number of passes a clean run
makes through the point (counted by a calibration run, not derived from the executor's code).
The in-flight window at the kill is measured from the outside: the ledger rows left claimed and
not completed (``sending`` or ``in_doubt``), read from the database before the restart. Trials
alternate between a plain receiver (duplicates <= in flight) and one that dedupes on the key
(each action takes effect once).
"""

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoexec_dagster import ActionLedger, route
from autoexec_dagster.ledger import schema
from tests.crash_worker import POINTS, ForkServer, Trial
from tests.delivery_worker import SECRET, insight, playbook
from tests.receivers import WebhookReceiver
from tests.reliability import FULL, record, trials

ENTITIES = trials(1_000, 10_000)
TRIALS = trials(2, 4)
CONCURRENCY = 32
SEED = 20261124
DEADLINE = trials(60, 300)
# k is drawn from the first 80% of a clean run's passes: flush and claim counts vary a little
# from run to run, and a k that is never reached would kill nothing.
REACH = 0.8
_calibrated: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("crash_points")) as fork_server:
        yield fork_server


def _backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _spec(url: str, receiver: WebhookReceiver, partition: str, **extra: Any) -> dict[str, Any]:
    return {
        "ledger": url,
        "webhook": receiver.url,
        "entities": ENTITIES,
        "partition": partition,
        "concurrency": CONCURRENCY,
        **extra,
    }


def _keys(partition: str) -> set[str]:
    return set(route(insight(ENTITIES), playbook(), partition_key=partition)["idempotency_key"])


def _ok(trial: Trial, server: ForkServer) -> dict[str, Any]:
    assert trial.code == 0 and trial.result is not None and trial.result["outcome"] == "ok", (
        f"{trial.describe()}\n{(trial.result or {}).get('traceback', '')}\n{server.log_tail()}"
    )
    return trial.result


def _passes(server: ForkServer, url: str) -> dict[str, int]:
    """How often a clean run passes each point (once per backend and size)."""
    backend = _backend(url)
    if backend not in _calibrated:
        with WebhookReceiver(secret=SECRET) as receiver:
            clean = _ok(server.run(_spec(url, receiver, "calibration"), deadline=DEADLINE), server)
        _calibrated[backend] = {point: int(clean["counts"].get(point, 0)) for point in POINTS}
    return _calibrated[backend]


def _trial(server: ForkServer, url: str, point: str, index: int, passes: int) -> None:
    backend = _backend(url)
    rng = random.Random(f"{SEED}:{backend}:{point}:{index}")
    kill_after = rng.randint(1, max(1, int(passes * REACH)))
    dedupe = index % 2 == 1
    partition = f"{point}-{index}"
    print(
        f"crash point {point} on {backend}, trial {index}: kill_after={kill_after} of {passes} "
        f"passes (seed {SEED}), {ENTITIES} actions, {'deduping' if dedupe else 'plain'} receiver"
    )
    keys = _keys(partition)
    ledger = ActionLedger(url)
    try:
        with WebhookReceiver(secret=SECRET, dedupe=dedupe, latency_seconds=0.001) as receiver:
            spec = _spec(url, receiver, partition)
            killed = server.run(
                {**spec, "point": point, "kill_after": kill_after}, deadline=DEADLINE
            )
            assert killed.killed, (
                f"the worker was not killed at {point}#{kill_after}: {killed.describe()}"
            )
            at_kill = ledger.state_counts(partition_key=partition)
            in_flight = at_kill.get(schema.SENDING, 0) + at_kill.get(schema.IN_DOUBT, 0)
            seen_at_kill = len(receiver.unique_keys)

            restarted = _ok(server.run(spec, deadline=DEADLINE), server)
            final = ledger.state_counts(partition_key=partition)
            delivered = receiver.unique_keys
            lost = len(keys - delivered)
            # Repeated requests for a key: a plain receiver accepts them again; a deduping one
            # acknowledges them without a second effect.
            resent = (
                receiver.duplicates if dedupe else sum(n - 1 for n in receiver.deliveries.values())
            )
            effects = max(receiver.deliveries.values(), default=0)
    finally:
        ledger.dispose()
    problem = None
    if lost or delivered != keys or final != {schema.SUCCEEDED: ENTITIES}:
        problem = f"lost {lost}, final states {final}"
    elif resent > in_flight or (dedupe and effects > 1):
        problem = f"{resent} duplicate(s), {in_flight} in flight, {effects} effect(s) per key"
    record(
        "crash_points",
        point=point,
        backend=backend,
        actions=ENTITIES,
        kill_after=kill_after,
        in_flight=in_flight,
        lost=lost,
        duplicates=resent,
        receiver="dedupe" if dedupe else "plain",
        duplicate_effects=max(0, effects - 1),
        seen_at_kill=seen_at_kill,
        faults=1,
        problem=problem,
    )
    assert lost == 0, f"{lost} action(s) never reached the receiver"
    assert delivered == keys, "the receiver saw keys that are not in the plan"
    assert final == {schema.SUCCEEDED: ENTITIES}, final
    assert restarted["report"]["in_doubt_recovered"] == in_flight
    assert resent <= in_flight, f"{resent} duplicate(s), but only {in_flight} were in flight"
    if dedupe:
        assert effects == 1, "a deduping receiver applied an action twice: the key changed"


@pytest.mark.timeout(trials(180, 7200))
@pytest.mark.parametrize("point", POINTS)
def test_a_worker_killed_at_a_named_point_loses_nothing(
    server: ForkServer, ledger_url: str, point: str, tmp_path: Path
) -> None:
    if _backend(ledger_url) == "postgresql" and not FULL:
        pytest.skip("crash points on PostgreSQL run in full mode (make reliability)")
    passes = _passes(server, ledger_url)
    assert passes[point] > 0, f"a clean run never passed {point}: {passes}"
    for index in range(TRIALS):
        _trial(server, ledger_url, point, index, passes[point])
