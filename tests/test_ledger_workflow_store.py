"""The workflow store's queries: the due-work query reads only the index of active instances."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from autoexec_dagster.ledger.action_ledger import ActionLedger


def _instances(n: int, *, partition: str) -> list[dict[str, Any]]:
    return [
        {
            "instance_id": f"{partition}-{i}",
            "playbook": "pb",
            "playbook_version": "v1",
            "workflow": "wf",
            "insight": "scores",
            "partition_key": partition,
            "entity_id": f"E{i}",
            "rule": "r",
            "step": "first",
            "data": "{}",
            "run_id": None,
        }
        for i in range(n)
    ]


def _plans(ledger: ActionLedger, call: Any) -> list[str]:
    """The query plan (EXPLAIN QUERY PLAN) of every statement ``call`` runs on SQLite."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(ledger.engine, "before_cursor_execute", capture)
    try:
        call()
    finally:
        event.remove(ledger.engine, "before_cursor_execute", capture)
    plans = []
    with ledger.engine.connect() as conn:
        for statement, parameters in seen:
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            plans.append(" | ".join(str(r[-1]) for r in rows))
    return plans


def test_the_due_work_query_uses_the_partial_index_of_active_instances(sqlite_url):
    clock_now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    ledger = ActionLedger(sqlite_url, clock=lambda: clock_now)
    ledger.start_instances(_instances(50, partition="p1") + _instances(20, partition="p2"))
    plans = _plans(ledger, lambda: ledger.due_partitions(playbook="pb"))
    assert plans and all("ix_autoexec_workflow_due" in p for p in plans), plans
    (next_plan,) = _plans(ledger, lambda: ledger.next_due(playbook="pb"))
    assert "ix_autoexec_workflow_due" in next_plan
    assert ledger.due_partitions(playbook="pb") == [
        ("p1", 50, clock_now),
        ("p2", 20, clock_now),
    ]


def test_due_times_come_back_aware(sqlite_url):
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    ledger = ActionLedger(sqlite_url, clock=lambda: now)
    assert ledger.next_due(playbook="pb") is None
    ledger.start_instances(_instances(1, partition="p1"))
    due = ledger.next_due(playbook="pb")
    assert due == now and due is not None and due.tzinfo is not None


@pytest.mark.postgres
def test_due_work_on_postgresql(postgres_url):
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    ledger = ActionLedger(postgres_url, clock=lambda: now)
    ledger.start_instances(_instances(3, partition="p1"))
    assert ledger.due_partitions(playbook="pb") == [("p1", 3, now)]
    assert ledger.due_partitions(playbook="pb", now=now - timedelta(seconds=1)) == []
    with ledger.engine.connect() as conn:
        indexes = conn.execute(
            sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_autoexec_workflow_due'")
        ).scalar_one()
    assert "WHERE" in indexes and "running" in indexes
