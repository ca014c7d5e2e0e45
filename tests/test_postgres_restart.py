"""The delivery promise when PostgreSQL restarts under a running worker.

A worker process executes a few thousand webhook actions against a PostgreSQL ledger and a
receiver with some latency. Once the receiver has seen deliveries, the cluster is restarted
(``pg_ctlcluster ... restart -m fast``, which terminates every session). Then:

- the worker rides through, or fails with a LedgerError naming the cause, within a bounded time;
- a new worker process completes the batch;
- nothing is lost (the receiver got every key), a deduping receiver counts each key once, and
  duplicates at a plain receiver are no more than the actions the ledger held in flight.

Restarting PostgreSQL disturbs every other test using it at that moment: CI runs the suite
serially; while developing, run this file alone.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoexec_dagster import ActionLedger
from autoexec_dagster.ledger import schema
from tests.delivery_worker import plan_keys
from tests.receivers import WebhookReceiver
from tests.reliability import record, trials
from tests.restart_worker import FAILED_CLEARLY

ROOT = Path(__file__).resolve().parents[1]
ENTITIES = trials(2_000, 5_000)
CONCURRENCY = 20
LATENCY = 0.05  # about 400 deliveries/s: the batch outlasts the restart by seconds
RESTART_AFTER = 300  # deliveries the receiver has seen before the restart
WORKER_TIMEOUT = 60.0  # a worker still running by then is hung
READY_TIMEOUT = 60.0
# What a clear error names: the connection or the server that went away.
CAUSE = re.compile(
    r"connect|terminat|server closed|shut ?down|administrator|closed the connection|unavailable",
    re.IGNORECASE,
)


def _cluster() -> tuple[str, str] | None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return (versions[-1], "main") if versions else None


def _skip_reason() -> str | None:
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_isready") is None:
        return "pg_ctlcluster/pg_isready not installed: cannot restart PostgreSQL"
    if os.geteuid() != 0:
        return "not root: pg_ctlcluster cannot restart the cluster"
    if _cluster() is None:
        return "no cluster under /etc/postgresql"
    return None


pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def _start_worker(ledger_url: str, webhook_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.restart_worker",
            "--ledger",
            ledger_url,
            "--webhook",
            webhook_url,
            "--entities",
            str(ENTITIES),
            "--concurrency",
            str(CONCURRENCY),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _finish(worker: subprocess.Popen[str]) -> tuple[int | None, dict, str]:
    """Wait for the worker; a hung one is asked for its stacks, killed, and reported as None."""
    try:
        out, err = worker.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        # restart_worker answers SIGUSR2 with its thread and asyncio task stacks, then exits.
        worker.send_signal(signal.SIGUSR2)
        try:
            out, err = worker.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, err = worker.communicate(timeout=30)
        return None, {}, err
    lines = out.strip().splitlines()
    return worker.returncode, json.loads(lines[-1]) if lines else {}, err


def _wait_for_deliveries(receiver: WebhookReceiver, worker: subprocess.Popen[str]) -> None:
    """Block until the receiver saw RESTART_AFTER requests; fail early if the worker ended."""
    deadline = time.monotonic() + WORKER_TIMEOUT
    while not receiver.wait_for_requests(RESTART_AFTER, timeout=1.0):
        if worker.poll() is not None:
            _, err = worker.communicate(timeout=30)
            pytest.fail(
                f"the worker ended before the restart (exit {worker.returncode}):\n{err[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"the receiver saw fewer than {RESTART_AFTER} requests in {WORKER_TIMEOUT:.0f} s"
            )


def _start_time(admin_url: str) -> float:
    import psycopg  # here, not at import: without it the postgres fixtures skip the test

    with psycopg.connect(admin_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT extract(epoch FROM pg_postmaster_start_time())").fetchone()
    assert row is not None
    return float(row[0])


def _restart_postgres() -> float:
    """Restart the cluster and wait until it answers; returns how long it was unavailable."""
    cluster = _cluster()
    assert cluster is not None
    started = time.perf_counter()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "-m", "fast", *cluster, "restart"],
        check=True,
        capture_output=True,
        timeout=READY_TIMEOUT,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        # pg_isready itself waits up to -t seconds for an answer: no sleep needed between tries.
        ready = subprocess.run(
            ["pg_isready", "-h", "127.0.0.1", "-t", "2"], capture_output=True, timeout=10
        )
        if ready.returncode == 0:
            return time.perf_counter() - started
        if time.monotonic() > deadline:
            pytest.fail(f"PostgreSQL did not come back within {READY_TIMEOUT:.0f} s")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dedupe", [True, False], ids=["deduping", "plain"])
def test_a_postgres_restart_mid_run_loses_nothing(dedupe: bool, postgres_url, postgres_admin):
    keys = set(plan_keys(ENTITIES))
    ActionLedger(postgres_url)  # the schema exists before the worker, as in a deployment
    before = _start_time(postgres_admin)
    with WebhookReceiver(latency_seconds=LATENCY, dedupe=dedupe) as receiver:
        worker = _start_worker(postgres_url, receiver.url)
        try:
            _wait_for_deliveries(receiver, worker)
            outage = _restart_postgres()
            seen_at_restart = len(receiver.unique_keys)
            code, verdict, err = _finish(worker)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(30)
        assert _start_time(postgres_admin) > before, "PostgreSQL was not restarted"
        assert seen_at_restart < ENTITIES, "the restart came after the batch: it tested nothing"
        # The first worker's verdict is asserted last: the recovery from whatever it left
        # behind (and the figures) is worth checking even when it hung or crashed.
        hung = code is None
        clear = code == 0 or (
            code == FAILED_CLEARLY
            and verdict.get("error") == "LedgerError"
            and CAUSE.search(verdict.get("message", "")) is not None
        )
        states = ActionLedger(postgres_url).state_counts()
        in_flight = states.get(schema.SENDING, 0) + states.get(schema.IN_DOUBT, 0)

        again = _start_worker(postgres_url, receiver.url)
        code_again, verdict_again, err_again = _finish(again)
        assert code_again == 0, (
            f"the re-run did not complete ({verdict_again}):\n{err_again[-3000:]}"
        )
        final = ActionLedger(postgres_url).state_counts()
        deliveries = receiver.deliveries
        repeated = receiver.duplicates

    lost = len(keys - set(deliveries))
    duplicates = repeated if dedupe else sum(n - 1 for n in deliveries.values())
    record(
        "postgres_restart",
        receiver="dedupe" if dedupe else "plain",
        actions=ENTITIES,
        seen_at_restart=seen_at_restart,
        outage_seconds=round(outage, 2),
        first_worker="hung" if hung else "rode through" if code == 0 else verdict.get("error"),
        first_error=(verdict.get("message") or "")[:300],
        in_flight=in_flight,
        recovered=verdict_again["report"].get("in_doubt_recovered"),
        lost=lost,
        duplicates=duplicates,
    )
    assert final == {schema.SUCCEEDED: ENTITIES}
    assert lost == 0
    if dedupe:
        assert set(deliveries.values()) == {1}
    # Only actions the ledger still held in flight when the first worker ended can arrive twice.
    assert duplicates <= in_flight
    if hung:
        tasks = err[err.find("pending asyncio tasks") :]
        pytest.fail(
            f"the worker hung after the restart (stopped after {WORKER_TIMEOUT:.0f} s):\n{tasks}"
        )
    assert clear, f"the worker failed without a LedgerError naming the cause (exit {code}): " + (
        str(verdict) if verdict else err[-3000:]
    )
