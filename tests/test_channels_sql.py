"""SqlChannel against real databases: SQLite files, and PostgreSQL when one is reachable."""

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.sql import SqlChannel
from autoexec_dagster.errors import (
    ChannelConfigError,
    PermanentChannelError,
    TransientChannelError,
)
from tests.channel_doubles import send_all

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

TASKS_DDL = """
CREATE TABLE crm_tasks (
    idempotency_key VARCHAR(200) PRIMARY KEY,
    customer_id VARCHAR(50) NOT NULL,
    score FLOAT,
    note TEXT,
    partition_key VARCHAR(20),
    created_at TIMESTAMP
)
"""


def make_request(key: str, **data: Any) -> ActionRequest:
    return ActionRequest(
        idempotency_key=key,
        entity_id=str(data.get("customer_id", key)),
        action="crm_task",
        playbook="churn",
        playbook_version="1",
        insight="churn_scores",
        partition_key="2024-05-01",
        rule="watch",
        data=data,
    )


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    path = tmp_path / "crm.db"
    with sqlite3.connect(path) as conn:
        conn.execute(TASKS_DDL)
        conn.execute("CREATE TABLE no_key (idempotency_key TEXT, note TEXT)")
        conn.execute("CREATE TABLE unique_key (id INTEGER PRIMARY KEY, k TEXT UNIQUE, note TEXT)")
    return f"sqlite:///{path}"


def tasks_channel(url: str, **overrides: Any) -> SqlChannel:
    fields: dict[str, Any] = {
        "url": url,
        "table": "crm_tasks",
        "columns": {
            "customer_id": "customer_id",
            "score": "churn_score",
            "note": "Call {{ name }} about {{ rule }} ({{ '%.2f' | format(churn_score) }})",
            "partition_key": "partition_key",
        },
        "max_concurrency": 4,
    }
    fields.update(overrides)
    return SqlChannel(**fields)


def plan(**columns: list[Any]) -> pd.DataFrame:
    base: dict[str, list[Any]] = {
        "entity_id": ["C1", "C2"],
        "customer_id": ["C1", "C2"],
        "name": ["Ann", "Bo"],
        "churn_score": [0.91, 0.55],
    }
    base.update(columns)
    return pd.DataFrame(base)


def rows_of(url: str, table: str = "crm_tasks") -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY idempotency_key"))
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


# -- SQLite ------------------------------------------------------------------------------------


def test_upsert_twice_leaves_one_row_with_the_latest_values(sqlite_db: str) -> None:
    ch = tasks_channel(sqlite_db)
    ch.validate_rows(plan())
    first = send_all(ch, [make_request("k1", customer_id="C1", name="Ann", churn_score=0.9)])
    again = send_all(ch, [make_request("k1", customer_id="C1", name="Ann", churn_score=0.95)])
    assert first == again == ["SQL upsert rowcount=1"]
    [row] = rows_of(sqlite_db)
    assert row["idempotency_key"] == "k1"
    assert row["customer_id"] == "C1"
    assert row["score"] == 0.95
    assert row["note"] == "Call Ann about watch (0.95)"
    assert row["partition_key"] == "2024-05-01"


def test_on_conflict_nothing_keeps_the_first_row(sqlite_db: str) -> None:
    ch = tasks_channel(sqlite_db, on_conflict="nothing")
    send_all(ch, [make_request("k1", customer_id="C1", name="Ann", churn_score=0.9)])
    send_all(ch, [make_request("k1", customer_id="C1", name="Ann", churn_score=0.1)])
    [row] = rows_of(sqlite_db)
    assert row["score"] == 0.9


def test_numpy_values_and_nan_are_bound(sqlite_db: str) -> None:
    ch = tasks_channel(
        sqlite_db,
        columns={"customer_id": "customer_id", "score": "churn_score", "created_at": "at"},
    )
    request = make_request(
        "k1",
        customer_id=np.str_("C1"),
        churn_score=np.float64("nan"),
        at=pd.Timestamp("2024-05-01 09:30:00"),
    )
    assert send_all(ch, [request]) == ["SQL upsert rowcount=1"]
    [row] = rows_of(sqlite_db)
    assert row["customer_id"] == "C1"
    assert row["score"] is None
    assert str(row["created_at"]).startswith("2024-05-01 09:30:00")


def test_concurrent_upserts_of_many_keys(sqlite_db: str) -> None:
    ch = tasks_channel(sqlite_db, max_concurrency=8)
    requests = [
        make_request(f"k{i:03d}", customer_id=f"C{i}", name="N", churn_score=i / 100)
        for i in range(100)
    ]
    results = send_all(ch, requests + requests[:10])
    assert all(r == "SQL upsert rowcount=1" for r in results)
    assert len(rows_of(sqlite_db)) == 100


def test_unique_column_that_is_not_the_primary_key_works_as_key(sqlite_db: str) -> None:
    ch = SqlChannel(url=sqlite_db, table="unique_key", key_column="k", columns={"note": "note"})
    ch.validate_rows(pd.DataFrame({"note": ["x"]}))
    send_all(ch, [make_request("k1", note="a")])
    send_all(ch, [make_request("k1", note="b")])
    engine = sa.create_engine(sqlite_db)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT k, note FROM unique_key")).all() == [("k1", "b")]
    engine.dispose()


def test_locked_database_is_transient(sqlite_db: str) -> None:
    path = sqlite_db.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        ch = tasks_channel(sqlite_db, timeout_seconds=0.05)
        [result] = send_all(ch, [make_request("k1", customer_id="C1", name="A", churn_score=1)])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert isinstance(result, TransientChannelError)
    assert "database is locked" in str(result)


def test_constraint_violation_is_permanent_without_the_value(sqlite_db: str) -> None:
    ch = tasks_channel(sqlite_db)
    [result] = send_all(ch, [make_request("k1", customer_id=None, name="Ann", churn_score=0.9)])
    assert isinstance(result, PermanentChannelError)
    assert "IntegrityError" in str(result)
    assert "NOT NULL constraint failed: crm_tasks.customer_id" in str(result)
    assert rows_of(sqlite_db) == []


# -- validation --------------------------------------------------------------------------------


def test_unknown_table(sqlite_db: str) -> None:
    with pytest.raises(ChannelConfigError, match="table 'crm_taks' does not exist"):
        tasks_channel(sqlite_db, table="crm_taks").validate_rows(plan())


def test_unknown_destination_column(sqlite_db: str) -> None:
    with pytest.raises(ChannelConfigError, match="table 'crm_tasks' has no column 'scroe'"):
        tasks_channel(
            sqlite_db, columns={"customer_id": "customer_id", "scroe": "churn_score"}
        ).validate_rows(plan())


def test_missing_key_column(sqlite_db: str) -> None:
    with pytest.raises(
        ChannelConfigError, match="table 'crm_tasks' has no key column 'action_key'"
    ):
        tasks_channel(sqlite_db, key_column="action_key").validate_rows(plan())


def test_key_column_that_is_not_unique(sqlite_db: str) -> None:
    ch = SqlChannel(url=sqlite_db, table="no_key", columns={"note": "name"})
    with pytest.raises(
        ChannelConfigError,
        match="key column 'idempotency_key' is neither the primary key nor unique",
    ):
        ch.validate_rows(plan())


def test_unmapped_not_null_column(sqlite_db: str) -> None:
    with pytest.raises(
        ChannelConfigError, match="column 'customer_id' is NOT NULL without a default"
    ):
        tasks_channel(sqlite_db, columns={"score": "churn_score"}).validate_rows(plan())


def test_key_column_cannot_be_mapped(sqlite_db: str) -> None:
    with pytest.raises(ChannelConfigError, match="'idempotency_key' is the key column"):
        tasks_channel(
            sqlite_db, columns={"customer_id": "customer_id", "idempotency_key": "name"}
        ).validate_rows(plan())


def test_missing_plan_column(sqlite_db: str) -> None:
    with pytest.raises(ChannelConfigError, match=r"needs column\(s\) \['churn_score'\]"):
        tasks_channel(sqlite_db).validate_rows(plan().drop(columns=["churn_score"]))


def test_template_errors_name_table_column_and_row(sqlite_db: str) -> None:
    bad_var = tasks_channel(sqlite_db, columns={"customer_id": "customer_id", "note": "{{ nmae }}"})
    with pytest.raises(
        ChannelConfigError,
        match=r"crm_tasks column 'note' template, row 0 \(entity_id 'C1'\): undefined variable: 'nmae'",
    ):
        bad_var.validate_rows(plan())
    bad_syntax = tasks_channel(sqlite_db, columns={"customer_id": "customer_id", "note": "{{ x"})
    with pytest.raises(ChannelConfigError, match="column 'note' template: template syntax error"):
        bad_syntax.validate_rows(plan())
    escape = tasks_channel(
        sqlite_db, columns={"customer_id": "customer_id", "note": "{{ ''.__class__.__mro__ }}"}
    )
    with pytest.raises(ChannelConfigError, match="refused by the template sandbox"):
        escape.validate_rows(plan())


def test_unsupported_dialect_does_not_leak_the_password() -> None:
    ch = SqlChannel(url="mysql+pymysql://app:hunter2@db.internal/crm", table="t")
    with pytest.raises(ChannelConfigError, match="dialect 'mysql' is not supported") as info:
        ch.validate_rows(pd.DataFrame())
    assert "hunter2" not in str(info.value)


def test_invalid_url_does_not_leak_it() -> None:
    ch = SqlChannel(url="not a url hunter2", table="t")
    with pytest.raises(ChannelConfigError, match="url is not a valid SQLAlchemy URL") as info:
        ch.validate_rows(pd.DataFrame())
    assert "hunter2" not in str(info.value)


def test_unset_env_var_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_SQL_URL", raising=False)
    ch = SqlChannel(url=dg.EnvVar("TEST_SQL_URL"), table="t")
    with pytest.raises(ChannelConfigError, match=r"'TEST_SQL_URL'.*is not set"):
        ch.validate_rows(pd.DataFrame())
    with pytest.raises(ChannelConfigError, match=r"'TEST_SQL_URL'.*is not set"):
        send_all(ch, [])


def test_env_var_url_and_masked_describe(monkeypatch: pytest.MonkeyPatch, sqlite_db: str) -> None:
    monkeypatch.setenv("TEST_SQL_URL", sqlite_db)
    ch = tasks_channel(dg.EnvVar("TEST_SQL_URL"))
    ch.validate_rows(plan())
    assert send_all(ch, [make_request("k", customer_id="C", name="N", churn_score=1)]) == [
        "SQL upsert rowcount=1"
    ]
    pg = SqlChannel(url="postgresql+psycopg://app:hunter2@db.internal/crm", table="t")
    assert "hunter2" not in repr(pg.describe())
    assert "***" in pg.describe()["url"]


def test_unreachable_database_is_a_config_error_at_validation() -> None:
    ch = SqlChannel(
        url="postgresql+psycopg://app:hunter2@127.0.0.1:1/crm", table="t", timeout_seconds=1
    )
    with pytest.raises(ChannelConfigError, match="cannot reflect it") as info:
        ch.validate_rows(pd.DataFrame())
    assert "hunter2" not in str(info.value)


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def pg_table() -> Iterator[str]:
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {str(exc).splitlines()[0]}")
    name = f"crm_tasks_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(TASKS_DDL.replace("crm_tasks", name)))
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        engine.dispose()


@pytest.mark.postgres
def test_postgres_upsert_twice_leaves_one_row(pg_table: str) -> None:
    ch = tasks_channel(PG_URL, table=pg_table, max_concurrency=8)
    ch.validate_rows(plan())
    requests = [
        make_request(f"k{i:03d}", customer_id=f"C{i}", name="N", churn_score=i / 100)
        for i in range(50)
    ]
    assert send_all(ch, requests) == ["SQL upsert rowcount=1"] * 50
    changed = make_request("k000", customer_id="C0", name="Zed", churn_score=0.5)
    assert send_all(ch, [changed, *requests[1:5]]) == ["SQL upsert rowcount=1"] * 5
    rows = rows_of(PG_URL, pg_table)
    assert len(rows) == 50
    assert rows[0]["note"] == "Call Zed about watch (0.50)"


@pytest.mark.postgres
def test_postgres_validation_and_permanent_errors(pg_table: str) -> None:
    with pytest.raises(ChannelConfigError, match="has no column 'nope'"):
        tasks_channel(PG_URL, table=pg_table, columns={"nope": "name"}).validate_rows(plan())
    with pytest.raises(ChannelConfigError, match="does not exist"):
        tasks_channel(PG_URL, table=pg_table + "_missing").validate_rows(plan())
    ch = tasks_channel(PG_URL, table=pg_table, columns={"customer_id": "customer_id", "score": "s"})
    [result] = send_all(ch, [make_request("k", customer_id="C1", s="not-a-number")])
    assert isinstance(result, PermanentChannelError)
    assert "SQLSTATE" in str(result)
    assert "not-a-number" not in str(result)
