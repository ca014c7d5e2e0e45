"""Races in the action ledger found in review (issue 6, defect 9); each failed before its fix."""

import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.action_ledger import ActionLedger, Outcome, new_worker_id


def _together(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released at once; returns results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _escalation(key: str) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "playbook": "pb",
        "playbook_version": "v1",
        "insight": "scores",
        "partition_key": "2026-11-24",
        "entity_id": key,
        "rule": "r",
        "kind": "rule",
        "reason": "a person decides",
        "data": {},
    }


@pytest.mark.postgres
def test_concurrent_pauses_of_a_new_scope_do_not_collide(postgres_url):
    ledgers = [ActionLedger(postgres_url) for _ in range(8)]
    for round_ in range(10):
        results = _together(
            8, lambda i, r=round_: ledgers[i].pause(f"pb{r}", reason="incident", by=f"p{i}")
        )
        assert [r for r in results if isinstance(r, Exception)] == []
    assert ledgers[0].pause_reason("pb9") is not None


@pytest.mark.postgres
def test_concurrent_escalations_are_each_reported_new_once(postgres_url):
    ledgers = [ActionLedger(postgres_url) for _ in range(4)]
    rows = [_escalation(f"k{i}") for i in range(300)]
    results = _together(4, lambda i: ledgers[i].open_escalations(rows))
    assert [r for r in results if isinstance(r, Exception)] == []
    reported = [key for keys in results for key in keys]
    assert sorted(reported) == sorted(r["idempotency_key"] for r in rows)


def test_complete_opens_no_escalation_for_a_claim_it_does_not_hold(sqlite_url):
    ledger = ActionLedger(sqlite_url)
    row = {k: v for k, v in _escalation("k0").items() if k not in ("kind", "reason", "data")}
    ledger.reserve([{**row, "action": "email", "decision": "act", "state": schema.RESERVED}])
    holder, intruder = new_worker_id(), new_worker_id()
    ledger.claim(["k0"], worker=holder, lease_seconds=60, run_id=None)
    failed = Outcome(
        key="k0", state=schema.FAILED, attempts=1, error="HTTP 500", escalation_kind="delivery"
    )
    assert ledger.complete([failed], worker=intruder) == 0
    assert ledger.escalations(status=None).empty


def test_a_reused_pid_does_not_keep_a_dead_worker_alive(sqlite_url):
    ledger = ActionLedger(sqlite_url)
    row = {k: v for k, v in _escalation("k0").items() if k not in ("kind", "reason", "data")}
    ledger.reserve([{**row, "action": "email", "decision": "act", "state": schema.RESERVED}])
    code = "from autoexec_dagster.ledger.action_ledger import new_worker_id as w; print(w())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead_worker = dead.stdout.strip()
    dead_pid = next(p for p in dead_worker.split(":") if p.isdigit() and len(p) < 8)
    # The kernel hands the dead worker's pid to an unrelated process.
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    ) as other:
        reused = dead_worker.replace(f":{dead_pid}:", f":{other.pid}:", 1)
        ledger.claim(["k0"], worker=reused, lease_seconds=3600, run_id=None)
        try:
            assert ledger.recover(["k0"]) == {"k0": "at_least_once"}
        finally:
            assert other.stdin is not None
            other.stdin.close()
