import json
import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from autoexec_dagster.errors import LedgerError
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.action_ledger import ActionLedger, Outcome, new_worker_id


def _rows(n: int, *, prefix: str = "k", delivery: str = "at_least_once") -> list[dict]:
    return [
        {
            "idempotency_key": f"{prefix}{i}",
            "playbook": "pb",
            "playbook_version": "v1",
            "insight": "scores",
            "partition_key": "2026-11-24",
            "entity_id": f"E{i}",
            "rule": "r",
            "action": "email",
            "decision": "act",
            "state": schema.RESERVED,
            "delivery": delivery,
        }
        for i in range(n)
    ]


def test_schema_is_created_and_versioned(ledger_url):
    ledger = ActionLedger(ledger_url)
    assert ledger.schema_version == schema.SCHEMA_VERSION
    tables = set(sa.inspect(ledger.engine).get_table_names())
    assert {
        "autoexec_actions",
        "autoexec_escalations",
        "autoexec_controls",
        "autoexec_schema_version",
    } <= tables
    ActionLedger(ledger_url)  # opening again migrates nothing and fails nothing


def test_a_newer_schema_is_refused(sqlite_url):
    ledger = ActionLedger(sqlite_url)
    with ledger.engine.begin() as conn:
        conn.execute(sa.update(schema.schema_version).values(version=schema.SCHEMA_VERSION + 1))
    with pytest.raises(LedgerError, match="newer than this release supports"):
        ActionLedger(sqlite_url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "not a valid SQLAlchemy URL"),
        ("mysql://root@127.0.0.1/test", "supports SQLite and PostgreSQL"),
        ("sqlite:////nonexistent-folder-xyz/ledger.db", "does not exist"),
        ("postgresql+psycopg://nobody:secret@127.0.0.1:1/none", "cannot open the action ledger"),
    ],
)
def test_unopenable_ledgers_fail_clearly_without_leaking_passwords(url, message):
    with pytest.raises(LedgerError, match=message) as caught:
        ActionLedger(url)
    assert "secret" not in str(caught.value)


def test_reserve_is_idempotent_and_returns_only_new_keys(ledger_url):
    ledger = ActionLedger(ledger_url)
    assert sorted(ledger.reserve(_rows(3))) == ["k0", "k1", "k2"]
    assert sorted(ledger.reserve(_rows(5))) == ["k3", "k4"]
    assert ledger.summary()["count"].sum() == 5


def test_two_workers_never_claim_the_same_action(ledger_url):
    first, second = ActionLedger(ledger_url), ActionLedger(ledger_url)
    first.reserve(_rows(100))
    keys = [f"k{i}" for i in range(100)]
    a = [
        i.key for i in first.claim(keys[:60], worker=new_worker_id(), lease_seconds=60, run_id="r1")
    ]
    b = [i.key for i in second.claim(keys, worker=new_worker_id(), lease_seconds=60, run_id="r2")]
    assert len(a) == 60
    assert sorted(b) == sorted(keys[60:])
    assert not set(a) & set(b)


def test_only_the_claiming_worker_completes(ledger_url):
    ledger = ActionLedger(ledger_url)
    ledger.reserve(_rows(2))
    worker, intruder = new_worker_id(), new_worker_id()
    ledger.claim(["k0", "k1"], worker=worker, lease_seconds=60, run_id=None)
    ledger.complete([Outcome(key="k0", state=schema.SUCCEEDED, attempts=1)], worker=intruder)
    assert ledger.states(["k0"])["k0"][0] == schema.SENDING
    ledger.complete(
        [
            Outcome(key="k0", state=schema.SUCCEEDED, attempts=2, detail="HTTP 200"),
            Outcome(
                key="k1",
                state=schema.FAILED,
                attempts=5,
                error="HTTP 500",
                escalation_kind="delivery_failed",
            ),
        ],
        worker=worker,
        escalation_context={
            "k1": {
                "playbook": "pb",
                "partition_key": "2026-11-24",
                "entity_id": "E1",
                "data": {"x": 1},
            }
        },
    )
    actions = ledger.actions().set_index("idempotency_key")
    assert actions.loc["k0", "state"] == schema.SUCCEEDED and actions.loc["k0", "attempts"] == 2
    assert actions.loc["k1", "state"] == schema.FAILED
    queue = ledger.escalations(playbook="pb")
    assert queue["idempotency_key"].tolist() == ["k1"]
    assert queue.loc[0, "kind"] == "delivery_failed" and '"x": 1' in str(queue.loc[0, "data"])
    assert ledger.resolve_escalation("k1", by="ana", resolution="called the customer")
    assert ledger.escalations(playbook="pb").empty
    assert not ledger.resolve_escalation("k1", by="ana")


def test_recovery_of_a_dead_workers_claims(ledger_url):
    ledger = ActionLedger(ledger_url)
    ledger.reserve(_rows(3) + _rows(1, prefix="m", delivery="at_most_once"))
    code = "from autoexec_dagster.ledger.liveness import new_worker_id as w; print(w())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dead_worker = dead.stdout.strip()  # the worker id of a process that has exited
    ledger.claim(["k0", "k1", "m0"], worker=dead_worker, lease_seconds=3600, run_id=None)
    live = new_worker_id()
    ledger.claim(["k2"], worker=live, lease_seconds=3600, run_id=None)
    recovered = ledger.recover(["k0", "k1", "k2", "m0"])
    assert recovered == {"k0": "at_least_once", "k1": "at_least_once", "m0": "at_most_once"}
    # At-least-once in-doubt actions may be claimed again; the at-most-once one may not.
    again = ledger.claim(["k0", "k1", "m0"], worker=live, lease_seconds=60, run_id=None)
    assert sorted(i.key for i in again) == ["k0", "k1"]


def test_expired_leases_are_recovered(ledger_url):
    ledger = ActionLedger(ledger_url)
    ledger.reserve(_rows(1))
    ledger.claim(["k0"], worker="otherhost:1:abc", lease_seconds=30, run_id=None)
    assert ledger.recover(["k0"]) == {}
    assert ledger.recover(["k0"], now=10**12) == {"k0": "at_least_once"}


def test_heartbeat_extends_leases(ledger_url):
    ledger = ActionLedger(ledger_url)
    ledger.reserve(_rows(2))
    worker = new_worker_id()
    ledger.claim(["k0", "k1"], worker=worker, lease_seconds=1, run_id=None)
    assert ledger.heartbeat(worker=worker, lease_seconds=10_000) == 2


def test_kill_switch(ledger_url):
    ledger = ActionLedger(ledger_url)
    assert ledger.pause_reason("pb") is None
    ledger.pause("pb", reason="bad model release", by="ana")
    assert ledger.pause_reason("pb") == "playbook 'pb' is paused by ana: bad model release"
    assert ledger.pause_reason("other") is None
    ledger.pause(reason="incident 42", by="ops")
    assert ledger.pause_reason("other") == "every playbook is paused by ops: incident 42"
    ledger.resume(by="ops")
    ledger.resume("pb", by="ana")
    assert ledger.pause_reason("pb") is None
    assert set(ledger.controls()["scope"]) == {"*", "pb"}


def test_release_returns_claims(ledger_url):
    ledger = ActionLedger(ledger_url)
    ledger.reserve(_rows(2))
    worker = new_worker_id()
    ledger.claim(["k0", "k1"], worker=worker, lease_seconds=60, run_id=None)
    ledger.release(["k0"], worker=worker)
    assert ledger.states(["k0", "k1"]) == {
        "k0": (schema.RESERVED, None),
        "k1": (schema.SENDING, worker),
    }


@pytest.mark.postgres
def test_a_claim_on_postgres_finds_its_rows_by_key_whatever_the_statistics(postgres_url):
    # A freshly recorded partition is not in the planner's statistics yet (autovacuum analyses
    # after 10% of the table changed): it then believed few rows were reserved, served the
    # claim's lock from the state index and filtered every reserved row of the ledger against
    # the batch, so each claim cost grew with the partition (bench/RESULTS.md, sharding).
    ledger = ActionLedger(postgres_url)
    ledger.reserve(_rows(20_000))
    statements: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE"):
            statements.append((statement, parameters))

    event.listen(ledger.engine, "before_cursor_execute", capture)
    try:
        claimed = ledger.claim(
            [f"k{i}" for i in range(0, 20_000, 625)],
            worker=new_worker_id(),
            lease_seconds=60,
            run_id="r",
        )
    finally:
        event.remove(ledger.engine, "before_cursor_execute", capture)
    assert len(claimed) == 32 and len(statements) == 1
    statement, parameters = statements[0]
    with ledger.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
        row = cursor.fetchone()
        assert row is not None
        plan = json.dumps(row[0])
        cursor.close()
    ledger.dispose()
    assert "ix_autoexec_actions_state" not in plan, plan
    assert "autoexec_actions_pkey" in plan, plan
