"""Bad input for SqlQueryChannel: refused with the problem named, and nothing changes.

Three kinds: parameters naming columns the plan does not have, refused by ``validate_rows`` when
``execute_plan`` checks its channels (the ledger holds no row afterwards); configurations refused
when the channel is built (a statement that is not one SELECT, a bind parameter without a source,
a source nothing binds); and hostile values in entity columns, which are bound, so they match
literally and the table they name survives.
"""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from autoexec_dagster import ActionLedger, ChannelConfigError
from autoexec_dagster.channels.sql_query import SqlQueryChannel
from autoexec_dagster.ledger import payload
from tests.bad_input_support import Corpus, action_states, corpus_fixture, insight, run

QUERY = "SELECT supplier_id FROM suppliers WHERE sku = :sku ORDER BY supplier_id"
HOSTILE = "x'; DROP TABLE suppliers; --"


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    with corpus_fixture("sql_query") as c:
        yield c


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ActionLedger]:
    led = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.dispose()


@pytest.fixture
def stock_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'stock.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE suppliers (supplier_id TEXT PRIMARY KEY, sku TEXT)")
        conn.exec_driver_sql("CREATE TABLE decoy (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql(
            "INSERT INTO suppliers VALUES ('S1', 'SKU-A'), ('S2', 'SKU-A'), ('S9', ?)",
            (HOSTILE,),
        )
        conn.exec_driver_sql("INSERT INTO decoy VALUES (1)")
    engine.dispose()
    return url


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
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


def frame(skus: list[str]) -> pd.DataFrame:
    """The bad-input insight (customers C1, C2) with a SKU each."""
    return insight(sku=list[object](skus))


def outputs_by_entity(ledger: ActionLedger) -> dict[str, Any]:
    """Each action's stored output, by entity."""
    actions = ledger.actions(playbook="bad_input")
    return {
        str(entity): payload.loads(str(output))
        for entity, output in zip(actions["entity_id"], actions["output"], strict=True)
    }


# -- parameters naming unknown columns: refused before anything runs ----------------------------

UNKNOWN_COLUMNS = [
    "skuu",  # a typo
    "SKU",  # column names are case-sensitive
    "sku ",  # a trailing space
    "sku; DROP TABLE suppliers",
    "' OR '1'='1",
    "steps",  # only a workflow step's request has it, and it is not one value
    "decision",  # a routing column: in the plan, never in a request
    "reason",
]


@pytest.mark.parametrize("source", UNKNOWN_COLUMNS)
def test_a_parameter_naming_an_unknown_column_is_refused(
    source: str, stock_url: str, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        before = snapshot(stock_url)
        channel = SqlQueryChannel(url=stock_url, query=QUERY, params={"sku": source})
        with pytest.raises(
            ChannelConfigError,
            match=re.escape(
                f"parameter :sku reads column {source!r}, which the plan does not have"
            ),
        ) as info:
            run(channel, ledger, frame(["SKU-A", "SKU-B"]))
        assert "'sku'" in str(info.value)  # the columns that do exist are listed
        assert action_states(ledger) == []
        assert snapshot(stock_url) == before


# -- configurations refused when the channel is built -------------------------------------------

# (query, params, what the error says)
CONFIG_CASES: list[tuple[str, dict[str, str], str]] = [
    ("SELECT 1; DROP TABLE suppliers", {}, "more than one statement"),
    (QUERY + "; DELETE FROM suppliers", {"sku": "sku"}, "more than one statement"),
    (QUERY + " /* x */ ;\n UPDATE suppliers SET sku = NULL", {"sku": "sku"}, "more than one"),
    ("SELECT 1;;", {}, "more than one statement"),
    ("DROP TABLE suppliers", {}, "it starts with DROP"),
    ("DELETE FROM suppliers WHERE sku = :sku", {"sku": "sku"}, "it starts with DELETE"),
    ("REPLACE INTO suppliers VALUES ('S3', :sku)", {"sku": "sku"}, "it starts with REPLACE"),
    ("INSERT INTO decoy VALUES (2)", {}, "it starts with INSERT"),
    ("PRAGMA query_only = OFF", {}, "it starts with PRAGMA"),
    ("ATTACH DATABASE '/tmp/x.db' AS x", {}, "it starts with ATTACH"),
    ("VACUUM", {}, "it starts with VACUUM"),
    ("EXPLAIN " + QUERY, {"sku": "sku"}, "it starts with EXPLAIN"),
    (
        "WITH gone AS (DELETE FROM suppliers RETURNING *) SELECT * FROM gone",
        {},
        "contains DELETE",
    ),
    ("SELECT * INTO stolen FROM suppliers", {}, "contains INTO"),
    ("SELECT * FROM suppliers FOR UPDATE", {}, "contains UPDATE"),
    ("SELECT 'unterminated FROM suppliers", {}, "not closed"),
    ("/* unterminated SELECT 1", {}, "not closed"),
    ("   ", {}, "the query is empty"),
    (QUERY, {}, "query parameter(s) [':sku'] have no source in params"),
    (QUERY, {"skuu": "sku"}, "query parameter(s) [':sku'] have no source"),
    (QUERY, {"sku": "sku", "extra": "name"}, "params ['extra'] are not used by the query"),
    ("SELECT 1", {"sku": "sku"}, "(it binds nothing)"),
    (QUERY, {"sku": ""}, "params ['sku'] name no source"),
]


@pytest.mark.parametrize(("query", "params", "problem"), CONFIG_CASES)
def test_a_bad_configuration_is_refused_when_built(
    query: str, params: dict[str, str], problem: str, stock_url: str, corpus: Corpus
) -> None:
    with corpus.case():
        before = snapshot(stock_url)
        with pytest.raises(ChannelConfigError, match=re.escape(problem)):
            SqlQueryChannel(url=stock_url, query=query, params=params)
        assert snapshot(stock_url) == before


def test_one_trailing_semicolon_is_still_one_statement(stock_url: str) -> None:
    channel = SqlQueryChannel(url=stock_url, query="SELECT 1 AS one; -- done", returns="first")
    channel.validate_rows(pd.DataFrame())
    assert channel.sql() == "SELECT 1 AS one"


# -- hostile values: bound, matched literally ----------------------------------------------------

HOSTILE_VALUES = [
    HOSTILE,
    "' OR '1'='1",
    "SKU-A' --",
    "SKU-A'; DELETE FROM suppliers; --",
    "SKU-A\x00",
    "%",
    "SKU-_",
    "1; ATTACH DATABASE 'evil.db' AS evil",
]


def test_hostile_values_are_bound_and_match_literally(
    stock_url: str, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        before = snapshot(stock_url)
        channel = SqlQueryChannel(url=stock_url, query=QUERY, params={"sku": "sku"})
        report = run(channel, ledger, frame(HOSTILE_VALUES[:2]))
        assert report.succeeded == 2 and report.failed == 0
        outputs = outputs_by_entity(ledger)
        # C1's SKU is the one named like an injection: only the supplier with that SKU matches.
        assert [r["supplier_id"] for r in outputs["C1"]["rows"]] == ["S9"]
        assert outputs["C2"]["rows"] == []  # "' OR '1'='1" is a SKU nobody stocks
        assert snapshot(stock_url) == before


@pytest.mark.parametrize("value", HOSTILE_VALUES[2:])
def test_more_hostile_values_match_nothing(
    value: str, stock_url: str, ledger: ActionLedger, corpus: Corpus
) -> None:
    with corpus.case():
        before = snapshot(stock_url)
        channel = SqlQueryChannel(url=stock_url, query=QUERY, params={"sku": "sku"})
        report = run(channel, ledger, frame([value, "SKU-A"]))
        assert report.succeeded == 2
        outputs = outputs_by_entity(ledger)
        assert outputs["C1"]["rows"] == []
        assert [r["supplier_id"] for r in outputs["C2"]["rows"]] == ["S1", "S2"]
        assert snapshot(stock_url) == before
