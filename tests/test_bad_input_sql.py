"""SQL identifier injection in SqlChannel settings: table, schema, key column and column mapping
names are refused before anything is written, on SQLite and PostgreSQL; the target table keeps
its rows, a decoy table survives, and the ledger holds nothing.

Names never enter SQL text (the statement is built from the reflected table), so an injected
name can only fail to name a table or column; the last test shows that a table really named
like an injection is written to, quoted, and nothing else is touched.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from autoexec_dagster import ActionLedger, ChannelConfigError, SqlChannel
from tests.bad_input_support import Corpus, action_states, corpus_fixture, run

# (field, value, what the error says)
SQLITE_CASES: list[tuple[str, Any, str]] = [
    ("table", "tasks; DROP TABLE decoy", "does not exist"),
    ("table", "tasks; DROP TABLE decoy; --", "does not exist"),
    ("table", '"tasks"."x"', "does not exist"),
    ("table", 'tasks" ; DROP TABLE decoy; --', "does not exist"),
    ("table", "tasks--", "does not exist"),
    ("table", "tasks' OR '1'='1", "does not exist"),
    ("table", "`tasks`", "does not exist"),
    ("table", "[tasks]", "does not exist"),
    ("table", "tasks\x00decoy", "cannot reflect"),
    ("table", "main.tasks", "does not exist"),
    ("table", "", "does not exist"),
    ("schema_name", "main; DROP TABLE decoy", "cannot reflect"),
    ("schema_name", '"main"', "cannot reflect"),
    ("schema_name", "main\x00", "cannot reflect"),
    ("key_column", "idempotency_key; DROP TABLE decoy", "no key column"),
    ("key_column", '"idempotency_key"', "no key column"),
    ("key_column", "idempotency_key--", "no key column"),
    ("key_column", "idempotency_key\x00", "no key column"),
    ("key_column", "note", "neither the primary key nor unique"),
    ("columns", {"note; DROP TABLE decoy": "name"}, "has no column"),
    ("columns", {'"note"': "name"}, "has no column"),
    ("columns", {"note--": "name"}, "has no column"),
    ("columns", {"note`": "name"}, "has no column"),
    ("columns", {"note\x00": "name"}, "has no column"),
    ("columns", {"note) VALUES (1); DROP TABLE decoy; --": "name"}, "has no column"),
    ("columns", {"idempotency_key": "name"}, "is the key column"),
]


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    with corpus_fixture("sql_identifier_injection") as c:
        yield c


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ActionLedger]:
    led = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.dispose()


def _prepare(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE tasks (idempotency_key VARCHAR(80) PRIMARY KEY, note TEXT)"
        )
        conn.exec_driver_sql("CREATE TABLE decoy (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO tasks VALUES ('existing', 'kept')")
        conn.exec_driver_sql("INSERT INTO decoy VALUES (1)")
    engine.dispose()


def _snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return {
                name: sorted(tuple(r) for r in conn.execute(sa.select(table)))
                for name, table in meta.tables.items()
            }
    finally:
        engine.dispose()


def _refused(url: str, ledger: ActionLedger, field: str, value: Any, problem: str) -> None:
    _prepare(url)
    before = _snapshot(url)
    fields: dict[str, Any] = {"url": url, "table": "tasks", "columns": {"note": "name"}}
    fields[field] = value
    with pytest.raises(ChannelConfigError, match=problem):
        run(SqlChannel(**fields), ledger)
    assert _snapshot(url) == before
    assert set(before) == {"tasks", "decoy"}
    assert action_states(ledger) == []


@pytest.mark.parametrize(("field", "value", "problem"), SQLITE_CASES)
def test_sqlite_identifier_injection_is_refused(
    field: str, value: Any, problem: str, tmp_path: Path, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        _refused(f"sqlite:///{tmp_path / 'crm.db'}", ledger, field, value, problem)


POSTGRES_CASES: list[tuple[str, Any, str]] = [
    ("table", "tasks; DROP TABLE decoy", "does not exist"),
    ("table", '"tasks"."x"', "does not exist"),
    ("table", 'tasks" ; DROP TABLE decoy; --', "does not exist"),
    ("table", "public.tasks", "does not exist"),
    ("schema_name", "public; DROP TABLE decoy", "does not exist"),
    ("key_column", "idempotency_key; DROP TABLE decoy", "no key column"),
    ("columns", {"note; DROP TABLE decoy": "name"}, "has no column"),
    ("columns", {'"note"': "name"}, "has no column"),
]


@pytest.mark.postgres
@pytest.mark.parametrize(("field", "value", "problem"), POSTGRES_CASES)
def test_postgres_identifier_injection_is_refused(
    field: str, value: Any, problem: str, postgres_url: str, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        _refused(postgres_url, ledger, field, value, problem)


def test_a_table_named_like_an_injection_is_quoted_and_nothing_else_changes(
    tmp_path: Path, ledger: ActionLedger
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    _prepare(url)
    weird = "tasks; DROP TABLE decoy; --"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'CREATE TABLE "{weird}" (idempotency_key VARCHAR(80) PRIMARY KEY, note TEXT)'
        )
    engine.dispose()
    report = run(SqlChannel(url=url, table=weird, columns={"note": "name"}), ledger)
    assert report.succeeded == 2
    after = _snapshot(url)
    assert after["decoy"] == [(1,)]
    assert after["tasks"] == [("existing", "kept")]
    assert sorted(note for _, note in after[weird]) == ["Ann", "Bob"]
