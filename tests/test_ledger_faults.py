"""Ledger faults: a database error at any SQL statement of a batch ends the run, with success or a
clear ``LedgerError``, within seconds; a re-run completes the batch, nothing is lost, and
duplicates stay within the in-flight rows the fault left behind.

The fault is a driver error (``sqlite3.OperationalError("disk I/O error")``, or psycopg's
"server closed the connection") raised from a ``before_cursor_execute`` event on the ledger's
engine at the n-th statement the ledger executes. A clean run counts the batch's statements
first; the sweep then injects at every n (full mode) or at a spread of n that covers every ledger
method the batch uses (fast mode). Each run is a forked process with a deadline, so a hang fails
the test instead of blocking the suite.

Background tasks: a fault in a heartbeat or in a kill-switch poll must end the run with the
error too, not be swallowed while the run carries on without its lease or its kill switch.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from autoexec_dagster import ActionLedger, route
from autoexec_dagster.ledger import schema
from tests.crash_worker import ForkServer, Trial
from tests.delivery_worker import SECRET, insight, playbook
from tests.receivers import WebhookReceiver
from tests.reliability import FULL, record, trials

ACTIONS = 200
CONCURRENCY = 8
# A clean batch takes well under a second here; "within seconds" is the promise.
DEADLINE = 10.0
# Words that name the injected cause in an error message, per backend.
CAUSES = ("disk I/O error", "injected fault")
# Stop a sweep after this many hangs: each one costs a full deadline.
MAX_HANGS = trials(1, 5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("ledger_faults")) as fork_server:
        yield fork_server


def _backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def _spec(url: str, receiver: WebhookReceiver, partition: str, **extra: Any) -> dict[str, Any]:
    return {
        "ledger": url,
        "webhook": receiver.url,
        "entities": ACTIONS,
        "partition": partition,
        "concurrency": CONCURRENCY,
        **extra,
    }


def _keys(partition: str, entities: int = ACTIONS) -> set[str]:
    return set(route(insight(entities), playbook(), partition_key=partition)["idempotency_key"])


def _clean(trial: Trial, server: ForkServer) -> dict[str, Any]:
    result = trial.result or {}
    assert trial.code == 0 and result.get("outcome") == "ok", (
        f"{trial.describe()}\n{result.get('traceback', '')}\n{server.log_tail()}"
    )
    return result


def _ended_clearly(trial: Trial) -> str | None:
    """None when the faulted run ended well (success, or a LedgerError naming the cause)."""
    if trial.timed_out:
        return f"did not end within {DEADLINE:.0f} s ({trial.describe()})"
    result = trial.result
    if trial.code != 0 or result is None:
        return f"the worker died ({trial.describe()})"
    if result["outcome"] == "ok":
        return None
    if not result["ledger_error"]:
        return f"ended with {result['error_type']}, not LedgerError: {result['error'][:200]}"
    if not any(cause in result["error"] for cause in CAUSES):
        return f"the LedgerError does not name the cause: {result['error'][:300]}"
    return None


@dataclass
class _Checked:
    in_flight: int
    lost: int
    duplicates: int
    effects: int
    problem: str | None


def _fault_then_rerun(
    server: ForkServer, url: str, partition: str, *, dedupe: bool, **fault: Any
) -> tuple[Trial, _Checked]:
    """One faulted run, the in-flight rows it left, then a clean re-run and what the receiver saw."""
    keys = _keys(partition)
    ledger = ActionLedger(url)
    try:
        with WebhookReceiver(secret=SECRET, dedupe=dedupe, latency_seconds=0.001) as receiver:
            spec = _spec(url, receiver, partition)
            faulted = server.run({**spec, **fault}, deadline=DEADLINE)
            left = ledger.state_counts(partition_key=partition)
            in_flight = left.get(schema.SENDING, 0) + left.get(schema.IN_DOUBT, 0)
            problem = _ended_clearly(faulted)
            rerun = server.run(spec, deadline=DEADLINE)
            rerun_result = rerun.result or {}
            if problem is None and (rerun.code != 0 or rerun_result.get("outcome") != "ok"):
                problem = f"the re-run without faults failed: {rerun.describe()}"
            final = ledger.state_counts(partition_key=partition)
            if problem is None and final != {schema.SUCCEEDED: ACTIONS}:
                problem = f"the re-run left the batch unfinished: {final}"
            lost = len(keys - receiver.unique_keys)
            resent = (
                receiver.duplicates if dedupe else sum(n - 1 for n in receiver.deliveries.values())
            )
            effects = max(receiver.deliveries.values(), default=0)
    finally:
        ledger.dispose()
    if problem is None and lost:
        problem = f"{lost} action(s) lost"
    if problem is None and resent > in_flight:
        problem = f"{resent} duplicate(s) but only {in_flight} row(s) were in flight"
    if problem is None and dedupe and effects > 1:
        problem = "a deduping receiver applied an action twice: the key changed"
    return faulted, _Checked(in_flight, lost, resent, effects, problem)


def _sample(trace: list[str]) -> list[int]:
    """Fast mode: the first and a middle statement of every ledger method, plus a spread."""
    by_method: dict[str, list[int]] = {}
    for n, method in enumerate(trace, start=1):
        by_method.setdefault(method, []).append(n)
    chosen = {ns[0] for ns in by_method.values()} | {ns[len(ns) // 2] for ns in by_method.values()}
    step = max(1, len(trace) // 8)
    chosen |= set(range(1, len(trace) + 1, step)) | {len(trace)}
    return sorted(chosen)


def _record(url: str, n: int, trial: Trial, checked: _Checked, **extra: Any) -> None:
    result = trial.result or {}
    fault = trial.fault or {}
    record(
        "ledger_faults",
        backend=_backend(url),
        actions=ACTIONS,
        fault_at=n,
        method=fault.get("method"),
        statement=fault.get("statement"),
        outcome="hang" if trial.timed_out else result.get("outcome", f"exit {trial.code}"),
        error_type=result.get("error_type"),
        faults=int(result.get("faults", 1 if trial.fault else 0)),
        in_flight=checked.in_flight,
        lost=checked.lost,
        duplicates=checked.duplicates,
        duplicate_effects=max(0, checked.effects - 1),
        problem=checked.problem,
        **extra,
    )


@pytest.mark.timeout(trials(120, 3600))
def test_a_ledger_error_at_any_statement_ends_the_run_and_a_rerun_completes(
    server: ForkServer, ledger_url: str
) -> None:
    if _backend(ledger_url) == "postgresql" and not FULL:
        pytest.skip("the PostgreSQL sweep runs in full mode (make reliability)")
    with WebhookReceiver(secret=SECRET) as receiver:
        clean = _clean(
            server.run(_spec(ledger_url, receiver, "clean", trace=True), deadline=DEADLINE),
            server,
        )
    trace: list[str] = clean["trace"]
    assert clean["statements"] == len(trace) > 0
    ns = list(range(1, len(trace) + 1)) if FULL else _sample(trace)
    print(f"{len(trace)} ledger statements in a clean batch of {ACTIONS}; faults at n = {ns}")
    problems: list[str] = []
    hangs = 0
    for n in ns:
        trial, checked = _fault_then_rerun(
            server, ledger_url, f"fault-{n}", dedupe=n % 2 == 1, fault_at=n
        )
        _record(ledger_url, n, trial, checked, clean_statements=len(trace))
        if checked.problem:
            where = trial.fault or {"method": trace[n - 1], "statement": "?"}
            problems.append(f"n={n} ({where['method']}: {where['statement']}): {checked.problem}")
            hangs += trial.timed_out
            if hangs >= MAX_HANGS:
                break
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(120)
def test_a_persistent_ledger_outage_ends_the_run_with_a_ledger_error(
    server: ForkServer, sqlite_url: str
) -> None:
    # Every statement from the 40th on fails, as on a full disk: the run must give up, not spin.
    trial, checked = _fault_then_rerun(
        server, sqlite_url, "outage", dedupe=False, fault_at=40, fault_repeat=True
    )
    _record(sqlite_url, 40, trial, checked, repeat=True)
    assert (trial.result or {}).get("outcome") != "ok" or trial.timed_out, (
        "every statement failed, yet the run reported success"
    )
    assert checked.problem is None, checked.problem


def _background_fault(
    server: ForkServer,
    url: str,
    partition: str,
    *,
    latency: float,
    entities: int,
    concurrency: int,
    **fault: Any,
) -> tuple[Trial, _Checked]:
    keys = _keys(partition, entities)
    ledger = ActionLedger(url)
    try:
        with WebhookReceiver(secret=SECRET, latency_seconds=latency) as receiver:
            spec = _spec(url, receiver, partition, entities=entities, concurrency=concurrency)
            faulted = server.run({**spec, **fault}, deadline=DEADLINE)
            left = ledger.state_counts(partition_key=partition)
            in_flight = left.get(schema.SENDING, 0) + left.get(schema.IN_DOUBT, 0)
            rerun = server.run(spec, deadline=DEADLINE)
            final = ledger.state_counts(partition_key=partition)
            lost = len(keys - receiver.unique_keys)
            resent = sum(n - 1 for n in receiver.deliveries.values())
    finally:
        ledger.dispose()
    problem = _ended_clearly(faulted)
    if problem is None and (faulted.result or {}).get("outcome") == "ok":
        problem = "the run finished 'ok' although its background task failed"
    if problem is None and (rerun.code != 0 or final != {schema.SUCCEEDED: entities}):
        problem = f"the re-run did not finish the batch: {rerun.describe()}, {final}"
    if problem is None and lost:
        problem = f"{lost} action(s) lost"
    if problem is None and resent > in_flight:
        problem = f"{resent} duplicate(s) but only {in_flight} row(s) were in flight"
    return faulted, _Checked(in_flight, lost, resent, 1, problem)


@pytest.mark.timeout(120)
def test_a_failed_heartbeat_ends_the_run_with_the_error(
    server: ForkServer, sqlite_url: str
) -> None:
    # A 1.5 s lease heartbeats every 0.5 s; 200 actions at 8 x 50 ms take about 1.3 s.
    trial, checked = _background_fault(
        server,
        sqlite_url,
        "heartbeat",
        latency=0.05,
        entities=ACTIONS,
        concurrency=8,
        lease_seconds=1.5,
        fault_scope="heartbeat",
        fault_at=1,
    )
    _record(sqlite_url, 1, trial, checked, scope="heartbeat")
    assert (trial.result or {}).get("faults", 1 if trial.fault else 0) >= 1, (
        f"no heartbeat ran, the test proves nothing: {trial.describe()}"
    )
    assert checked.problem is None, checked.problem


@pytest.mark.timeout(120)
def test_a_failed_kill_switch_poll_ends_the_run_with_the_error(
    server: ForkServer, sqlite_url: str
) -> None:
    # Once every action is claimed, only the kill-switch watcher still asks whether the playbook
    # is paused; the last claimed requests take a second at the receiver, so it polls meanwhile
    # (64 actions at 32 x 1 s: about 2 s in all).
    trial, checked = _background_fault(
        server,
        sqlite_url,
        "kill_switch",
        latency=1.0,
        entities=64,
        concurrency=32,
        fault_scope="pause_reason",
        fault_after_claimed=True,
        fault_at=1,
    )
    _record(sqlite_url, 1, trial, checked, scope="pause_reason")
    assert (trial.result or {}).get("faults", 1 if trial.fault else 0) >= 1, (
        f"no kill-switch poll after the last claim, the test proves nothing: {trial.describe()}"
    )
    assert checked.problem is None, checked.problem
