"""SqlQueryChannel against real databases: SQLite files, and PostgreSQL when one is reachable.

The stock-replenishment story: a workflow step asks which suppliers stock a SKU, a later step
drafts a purchase order with the cheapest, and a poll reads the order's status until the supplier
confirms it.
"""

import asyncio
import datetime as dt
import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from autoexec_dagster import (
    ActionLedger,
    Playbook,
    PythonChannel,
    Rule,
    Step,
    Workflow,
    advance_workflows,
    execute_plan,
    route,
)
from autoexec_dagster.channels.base import ActionRequest, Delivered, as_delivered
from autoexec_dagster.channels.sql_query import SqlQueryChannel, json_value, read_only_problem
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)
from autoexec_dagster.ledger import payload
from autoexec_dagster.playbook import Guardrails
from tests.channel_doubles import send_all

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
HOSTILE = "x'; DROP TABLE suppliers; --"

SUPPLIERS_DDL = """
CREATE TABLE suppliers (
    supplier_id VARCHAR(20) PRIMARY KEY,
    sku VARCHAR(100) NOT NULL,
    price NUMERIC(10, 2) NOT NULL,
    stock INTEGER NOT NULL,
    updated DATE
)
"""
ORDERS_DDL = """
CREATE TABLE purchase_orders (
    po_id VARCHAR(40) PRIMARY KEY,
    sku VARCHAR(100) NOT NULL,
    supplier_id VARCHAR(20) NOT NULL,
    status VARCHAR(20) NOT NULL
)
"""
SUPPLIERS = [
    ("S1", "SKU-A", 9.50, 40, "2026-11-30"),
    ("S2", "SKU-A", 8.25, 15, "2026-11-29"),
    ("S3", "SKU-A", 11.00, 500, None),
    ("S4", "SKU-B", 3.10, 2, "2026-11-01"),
    ("S9", HOSTILE, 1.00, 99, None),
]
QUOTES = (
    "SELECT supplier_id, price, stock FROM suppliers "
    "WHERE sku = :sku AND stock >= :qty ORDER BY price, supplier_id"
)


def make_request(key: str = "k1", **data: Any) -> ActionRequest:
    return ActionRequest(
        idempotency_key=key,
        entity_id=str(data.get("sku", "SKU-A")),
        action="supplier_quotes",
        playbook="replenish",
        playbook_version="1",
        insight="stock_forecast",
        partition_key="2026-12-01",
        rule="short",
        data=data,
    )


def send_one(ch: SqlQueryChannel, request: ActionRequest) -> Delivered | ChannelError:
    """Send one request through a fresh sender; what it delivered, or the error it raised."""

    async def run() -> Delivered | ChannelError:
        async with ch.open_sender() as sender:
            try:
                return as_delivered(await sender.send(request))
            except ChannelError as exc:
                return exc

    return asyncio.run(run())


def delivered(ch: SqlQueryChannel, request: ActionRequest) -> dict[str, Any]:
    result = send_one(ch, request)
    assert isinstance(result, Delivered), result
    assert result.output is not None
    # What the ledger keeps must be plain JSON (no NaN, no tagged dates).
    json.dumps(result.output, allow_nan=False)
    return dict(result.output)


@pytest.fixture
def stock_db(tmp_path: Path) -> str:
    path = tmp_path / "stock.db"
    with sqlite3.connect(path) as conn:
        conn.execute(SUPPLIERS_DDL)
        conn.execute(ORDERS_DDL)
        conn.executemany("INSERT INTO suppliers VALUES (?, ?, ?, ?, ?)", SUPPLIERS)
    return f"sqlite:///{path}"


def quotes_channel(url: str, **overrides: Any) -> SqlQueryChannel:
    fields: dict[str, Any] = {
        "url": url,
        "query": QUOTES,
        "params": {"sku": "sku", "qty": "shortfall"},
        "max_concurrency": 4,
    }
    fields.update(overrides)
    return SqlQueryChannel(**fields)


def table_rows(url: str, table: str = "suppliers") -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1"))]
    finally:
        engine.dispose()


# -- rows, bound from entity columns, request fields and earlier steps ---------------------------


def test_rows_are_bound_from_entity_columns(stock_db: str) -> None:
    ch = quotes_channel(stock_db)
    ch.validate_rows(pd.DataFrame({"entity_id": ["SKU-A"], "sku": ["SKU-A"], "shortfall": [20]}))
    result = send_one(ch, make_request(sku="SKU-A", shortfall=20))
    assert isinstance(result, Delivered)
    assert result.receipt == "SQL query: 2 row(s)"
    # S2 is cheapest but holds only 15: not enough for a shortfall of 20.
    assert result.output == {
        "rows": [
            {"supplier_id": "S1", "price": 9.5, "stock": 40},
            {"supplier_id": "S3", "price": 11.0, "stock": 500},
        ],
        "row_count": 2,
        "truncated": False,
        "columns": ["supplier_id", "price", "stock"],
    }
    # A larger shortfall leaves only the supplier with enough stock.
    assert delivered(ch, make_request(sku="SKU-A", shortfall=100))["rows"] == [
        {"supplier_id": "S3", "price": 11.0, "stock": 500}
    ]


def test_parameters_from_request_fields_and_earlier_step_outputs(stock_db: str) -> None:
    path = stock_db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO purchase_orders VALUES ('PO-7', 'SKU-A', 'S2', 'pending')")
        conn.execute("INSERT INTO purchase_orders VALUES ('PO-8', 'SKU-B', 'S4', 'confirmed')")
    ch = SqlQueryChannel(
        url=stock_db,
        query="SELECT status, supplier_id FROM purchase_orders WHERE po_id = :po AND sku = :sku",
        params={"po": "draft_po.po_id", "sku": "entity_id"},
        returns="first",
    )
    # entity_id is a request field here: the request's data does not carry it.
    steps = {"quotes": {"row_count": 2}, "draft_po": {"po_id": "PO-7"}}
    request = make_request(sku="SKU-A", steps=steps)
    assert request.data.get("entity_id") is None
    assert delivered(ch, request) == {"status": "pending", "supplier_id": "S2", "found": True}
    other = make_request(sku="SKU-B", steps={"draft_po": {"po_id": "PO-7"}})
    assert delivered(ch, other) == {"status": None, "supplier_id": None, "found": False}


def test_empty_result_in_both_shapes(stock_db: str) -> None:
    rows = delivered(quotes_channel(stock_db), make_request(sku="SKU-Z", shortfall=1))
    assert rows == {
        "rows": [],
        "row_count": 0,
        "truncated": False,
        "columns": ["supplier_id", "price", "stock"],
    }
    first = send_one(
        quotes_channel(stock_db, returns="first"), make_request(sku="SKU-Z", shortfall=1)
    )
    assert isinstance(first, Delivered) and first.receipt == "SQL query: no row"
    # Every column is there, null, so a condition reading one of them still evaluates.
    assert first.output == {"supplier_id": None, "price": None, "stock": None, "found": False}


def test_max_rows_caps_the_rows_and_says_so(stock_db: str) -> None:
    capped = delivered(quotes_channel(stock_db, max_rows=2), make_request(sku="SKU-A", shortfall=1))
    assert [r["supplier_id"] for r in capped["rows"]] == ["S2", "S1"]
    assert capped["row_count"] == 2 and capped["truncated"] is True
    exact = delivered(quotes_channel(stock_db, max_rows=3), make_request(sku="SKU-A", shortfall=1))
    assert exact["row_count"] == 3 and exact["truncated"] is False


def test_rows_are_cut_to_fit_the_ledger_bound(stock_db: str) -> None:
    path = stock_db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO suppliers VALUES (?, 'SKU-BIG', 1, 1, ?)",
            [(f"B{i:03d}", "n" * 500) for i in range(100)],
        )
    ch = SqlQueryChannel(
        url=stock_db,
        query="SELECT supplier_id, updated AS note FROM suppliers WHERE sku = :sku ORDER BY 1",
        params={"sku": "sku"},
        max_rows=100,
    )
    output = delivered(ch, make_request(sku="SKU-BIG"))
    assert output["truncated"] is True
    assert 0 < output["row_count"] == len(output["rows"]) < 100
    assert output["rows"][0]["supplier_id"] == "B000"
    stored = payload.bounded_output(output)
    assert stored is not None and len(stored.encode()) <= payload.MAX_OUTPUT_BYTES
    assert payload.loads(stored) == output  # kept whole, not replaced by the truncation marker


def test_returns_first_flattens_the_first_row(stock_db: str) -> None:
    ch = quotes_channel(stock_db, returns="first")
    result = send_one(ch, make_request(sku="SKU-A", shortfall=1))
    assert isinstance(result, Delivered) and result.receipt == "SQL query: found"
    assert result.output == {"supplier_id": "S2", "price": 8.25, "stock": 15, "found": True}


def test_output_columns_must_be_distinct_and_not_found(stock_db: str) -> None:
    twice = SqlQueryChannel(url=stock_db, query="SELECT sku, sku FROM suppliers")
    result = send_one(twice, make_request())
    assert isinstance(result, PermanentChannelError)
    assert "column(s) ['sku'] more than once" in str(result)
    found = SqlQueryChannel(url=stock_db, query="SELECT 1 AS found", returns="first")
    result = send_one(found, make_request())
    assert isinstance(result, PermanentChannelError)
    assert "column named 'found'" in str(result)


# -- values are bound, never formatted -----------------------------------------------------------


def test_hostile_values_are_matched_literally_and_the_table_survives(stock_db: str) -> None:
    before = table_rows(stock_db)
    ch = quotes_channel(stock_db)
    hostile = delivered(ch, make_request(sku=HOSTILE, shortfall=1))
    assert hostile["rows"] == [{"supplier_id": "S9", "price": 1.0, "stock": 99}]
    for value in ("' OR '1'='1", "SKU-A' --", "SKU-A'; DELETE FROM suppliers; --", "%", "SKU-_"):
        assert delivered(ch, make_request(sku=value, shortfall=0))["rows"] == [], value
    # Not even a number-looking text is taken as SQL: 'stock >= :qty' compares with the value.
    assert delivered(ch, make_request(sku="SKU-A", shortfall="0 OR 1=1"))["row_count"] == 0
    assert table_rows(stock_db) == before


def test_values_from_steps_must_be_one_scalar(stock_db: str) -> None:
    ch = SqlQueryChannel(
        url=stock_db,
        query="SELECT supplier_id FROM suppliers WHERE sku = :sku",
        params={"sku": "quotes.rows"},
    )
    result = send_one(ch, make_request(steps={"quotes": {"rows": [{"sku": "SKU-A"}]}}))
    assert isinstance(result, PermanentChannelError)
    assert "parameter :sku (from 'quotes.rows') is a list" in str(result)


# -- missing sources at send time ----------------------------------------------------------------


def test_a_missing_step_output_field_names_what_exists(stock_db: str) -> None:
    ch = SqlQueryChannel(
        url=stock_db,
        query="SELECT status FROM purchase_orders WHERE po_id = :po",
        params={"po": "draft_po.po_id"},
        returns="first",
    )
    no_field = send_one(ch, make_request(steps={"draft_po": {"order": "PO-1", "ok": True}}))
    assert isinstance(no_field, PermanentChannelError)
    assert (
        "parameter :po reads 'draft_po.po_id', but the output of step 'draft_po' has no field "
        "'po_id'; it has ['ok', 'order']"
    ) in str(no_field)
    no_step = send_one(ch, make_request(steps={"quotes": {"row_count": 1}}))
    assert isinstance(no_step, PermanentChannelError)
    assert "step 'draft_po' has no output (steps with output: ['quotes'])" in str(no_step)
    outside = send_one(ch, make_request(sku="SKU-A"))  # a one-shot action has no steps at all
    assert isinstance(outside, PermanentChannelError)
    assert "steps with output: []" in str(outside)


def test_a_missing_column_at_send_time_is_permanent(stock_db: str) -> None:
    result = send_one(quotes_channel(stock_db), make_request(sku="SKU-A"))
    assert isinstance(result, PermanentChannelError)
    assert "parameter :qty reads column 'shortfall', which the request does not have" in str(result)
    assert "['sku']" in str(result)


# -- validate_rows: before anything runs ---------------------------------------------------------


def test_validate_rows_names_the_parameter_and_the_unknown_column(stock_db: str) -> None:
    ch = quotes_channel(stock_db, params={"sku": "skuu", "qty": "shortfall"})
    plan = pd.DataFrame({"entity_id": ["SKU-A"], "sku": ["SKU-A"], "shortfall": [3]})
    with pytest.raises(
        ChannelConfigError,
        match=r"parameter :sku reads column 'skuu', which the plan does not have "
        r"\(columns: \['entity_id', 'shortfall', 'sku'\]\)",
    ):
        ch.validate_rows(plan)
    assert ch.required_columns() == {"skuu", "shortfall"}


def test_request_fields_and_step_outputs_are_not_plan_columns(stock_db: str) -> None:
    ch = SqlQueryChannel(
        url=stock_db,
        query="SELECT status FROM purchase_orders WHERE po_id = :po AND sku = :sku",
        params={"po": "draft_po.po_id", "sku": "entity_id"},
    )
    assert ch.required_columns() == set()
    ch.validate_rows(pd.DataFrame({"entity_id": ["SKU-A"]}))
    # Routing columns exist in the plan but never reach a request: they do not count.
    decision = quotes_channel(stock_db, params={"sku": "decision", "qty": "shortfall"})
    with pytest.raises(ChannelConfigError, match="parameter :sku reads column 'decision'"):
        decision.validate_rows(
            pd.DataFrame({"decision": ["act"], "sku": ["SKU-A"], "shortfall": [1]})
        )


def test_validate_rows_checks_the_query_against_the_database(stock_db: str) -> None:
    plan = pd.DataFrame({"sku": ["SKU-A"]})
    typo = SqlQueryChannel(
        url=stock_db, query="SELECT * FROM supplierz WHERE sku = :sku", params={"sku": "sku"}
    )
    with pytest.raises(
        ChannelConfigError, match=r"does not run against .*no such table: supplierz"
    ):
        typo.validate_rows(plan)
    column = SqlQueryChannel(
        url=stock_db, query="SELECT pryce FROM suppliers WHERE sku = :sku", params={"sku": "sku"}
    )
    with pytest.raises(ChannelConfigError, match="no such column: pryce"):
        column.validate_rows(plan)


def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    ch = SqlQueryChannel(url=f"sqlite:///{path}", query="SELECT 1")
    with pytest.raises(ChannelConfigError, match=r"typo\.db does not exist"):
        ch.validate_rows(pd.DataFrame())
    with pytest.raises(ChannelConfigError, match="does not exist"):
        send_all(ch, [make_request()])
    assert not path.exists()


# -- configuration refused at construction -------------------------------------------------------


def test_a_bind_parameter_without_a_source(stock_db: str) -> None:
    with pytest.raises(
        ChannelConfigError,
        match=r"query parameter\(s\) \[':qty'\] have no source in params \(params: \['sku'\]\)",
    ):
        quotes_channel(stock_db, params={"sku": "sku"})


def test_an_unused_parameter(stock_db: str) -> None:
    with pytest.raises(
        ChannelConfigError,
        match=r"params \['store'\] are not used by the query \(it binds \[':sku', ':qty'\]\)",
    ):
        quotes_channel(stock_db, params={"sku": "sku", "qty": "shortfall", "store": "store"})
    with pytest.raises(ChannelConfigError, match=r"\(it binds nothing\)"):
        SqlQueryChannel(url=stock_db, query="SELECT 1", params={"x": "sku"})


def test_an_empty_source(stock_db: str) -> None:
    with pytest.raises(ChannelConfigError, match=r"params \['qty'\] name no source"):
        quotes_channel(stock_db, params={"sku": "sku", "qty": " "})


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("DELETE FROM suppliers", "it starts with DELETE"),
        ("UPDATE suppliers SET stock = 0", "it starts with UPDATE"),
        ("INSERT INTO suppliers VALUES ('S', 'X', 1, 1, NULL)", "it starts with INSERT"),
        ("DROP TABLE suppliers", "it starts with DROP"),
        ("SELECT 1; DROP TABLE suppliers", "more than one statement"),
        ("SELECT 1; SELECT 2", "more than one statement"),
        ("WITH d AS (DELETE FROM suppliers RETURNING *) SELECT * FROM d", "contains DELETE"),
        ("SELECT * INTO copy FROM suppliers", "contains INTO"),
        ("SELECT * FROM suppliers FOR UPDATE", "contains UPDATE"),
        ("SELECT * FROM suppliers FOR SHARE", "locks rows"),
        ("CREATE TABLE copy AS SELECT * FROM suppliers", "it starts with CREATE"),
        ("PRAGMA query_only = OFF", "it starts with PRAGMA"),
        ("ATTACH DATABASE 'x.db' AS x", "it starts with ATTACH"),
        ("", "the query is empty"),
        ("-- nothing here\n", "the query is empty"),
    ],
)
def test_statements_that_are_not_one_select_are_refused(
    stock_db: str, query: str, problem: str
) -> None:
    with pytest.raises(ChannelConfigError, match="must be one SELECT statement") as info:
        SqlQueryChannel(url=stock_db, query=query)
    assert problem in str(info.value)
    assert "retried and re-run freely" in str(info.value)  # says why
    assert len(table_rows(stock_db)) == len(SUPPLIERS)


def test_reads_that_only_look_like_writes_are_allowed(stock_db: str) -> None:
    # Keywords inside literals, quoted names and comments, and a trailing semicolon, are fine.
    ch = SqlQueryChannel(
        url=stock_db,
        query="""
            /* drop; delete */ SELECT 'a; DROP TABLE x' AS "update", sku AS copy -- ; DELETE
            FROM suppliers WHERE sku = :sku;
        """,
        params={"sku": "sku"},
        returns="first",
    )
    assert delivered(ch, make_request(sku="SKU-B")) == {
        "update": "a; DROP TABLE x",
        "copy": "SKU-B",
        "found": True,
    }
    assert read_only_problem("SELECT E'it\\'s; DELETE' , $q$; UPDATE$q$") is None
    with pytest.raises(ChannelConfigError, match="not closed"):
        read_only_problem("SELECT 'unterminated")


def test_an_invalid_url_is_refused_without_leaking_it() -> None:
    with pytest.raises(ChannelConfigError, match="url is not a valid SQLAlchemy URL") as info:
        SqlQueryChannel(url="not a url hunter2", query="SELECT 1")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ChannelConfigError, match="dialect 'mysql' is not supported") as info:
        SqlQueryChannel(url="mysql+pymysql://app:hunter2@db/x", query="SELECT 1")
    assert "hunter2" not in str(info.value)


def test_an_env_var_url_is_read_when_the_channel_runs(
    monkeypatch: pytest.MonkeyPatch, stock_db: str
) -> None:
    monkeypatch.delenv("TEST_QUERY_URL", raising=False)
    ch = quotes_channel(dg.EnvVar("TEST_QUERY_URL"))  # not resolvable yet, and not needed
    with pytest.raises(ChannelConfigError, match=r"'TEST_QUERY_URL'.*is not set"):
        ch.validate_rows(pd.DataFrame({"sku": ["A"], "shortfall": [1]}))
    monkeypatch.setenv("TEST_QUERY_URL", stock_db)
    assert delivered(ch, make_request(sku="SKU-B", shortfall=1))["row_count"] == 1


# -- errors, digest, description -----------------------------------------------------------------


def test_sql_errors_are_permanent(stock_db: str) -> None:
    # Not validated: the table is missing when the step runs.
    ch = SqlQueryChannel(
        url=stock_db, query="SELECT * FROM gone WHERE sku = :s", params={"s": "sku"}
    )
    result = send_one(ch, make_request(sku="SKU-A"))
    assert isinstance(result, PermanentChannelError)
    assert "no such table: gone" in str(result)


def test_a_locked_database_is_transient(stock_db: str) -> None:
    blocker = sqlite3.connect(stock_db.removeprefix("sqlite:///"), isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        result = send_one(
            quotes_channel(stock_db, timeout_seconds=0.05), make_request(sku="SKU-A", shortfall=1)
        )
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert isinstance(result, TransientChannelError)
    assert "database is locked" in str(result)


def test_an_unreachable_database_is_transient_and_masked() -> None:
    ch = SqlQueryChannel(
        url="postgresql+psycopg://app:hunter2@127.0.0.1:1/stock",
        query="SELECT 1",
        timeout_seconds=1,
    )
    result = send_one(ch, make_request())
    assert isinstance(result, TransientChannelError)
    assert "app:***@127.0.0.1:1/stock" in str(result)
    assert "hunter2" not in str(result)
    with pytest.raises(ChannelConfigError, match="cannot check the query") as info:
        ch.validate_rows(pd.DataFrame())
    assert "hunter2" not in str(info.value)


def test_digest_describe_and_delivery(stock_db: str) -> None:
    ch = quotes_channel(stock_db)
    a = ch.request_digest(make_request("k1", sku="SKU-A", shortfall=1))
    b = ch.request_digest(make_request("k1", sku="SKU-B", shortfall=9))
    assert a == b  # the bound values (entity data) are not part of it
    assert ch.request_digest(make_request("k2", sku="SKU-A")) != a
    assert (
        quotes_channel(stock_db, max_rows=5, returns="first").request_digest(make_request("k1"))
        != a
    )
    assert ch.delivery == "at_least_once"  # a read is safe to repeat after a crash
    pg = SqlQueryChannel(url="postgresql+psycopg://app:hunter2@db/stock", query="SELECT 1")
    described = pg.describe()
    assert "hunter2" not in repr(described)
    assert described["url"] == "postgresql+psycopg://app:***@db/stock"
    assert ch.describe()["params"] == {"sku": "sku", "qty": "shortfall"}
    assert ch.describe()["query"] == QUOTES


def test_json_values() -> None:
    assert json_value(Decimal("8.25")) == 8.25
    assert json_value(Decimal("12345678901234567890")) == 12345678901234567890
    assert json_value(Decimal("NaN")) is None
    assert json_value(float("inf")) is None
    assert json_value(dt.date(2026, 12, 1)) == "2026-12-01"
    assert json_value(datetime(2026, 12, 1, 9, 30, tzinfo=UTC)) == "2026-12-01T09:30:00+00:00"
    assert json_value(dt.time(9, 30)) == "09:30:00"
    assert json_value(timedelta(minutes=2)) == 120.0
    assert json_value(b"\x00\xff") == "00ff"
    assert json_value(uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert json_value({"a": [Decimal("1.5"), None]}) == {"a": [1.5, None]}


# -- as a workflow step --------------------------------------------------------------------------


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def test_a_query_step_feeds_later_steps_when_and_until(tmp_path: Path, stock_db: str) -> None:
    clock = Clock(datetime(2026, 12, 1, 8, 0, tzinfo=UTC))
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    db_path = stock_db.removeprefix("sqlite:///")
    drafted: list[str] = []

    def draft_po(request: ActionRequest) -> dict[str, Any]:
        best = request.data["steps"]["quotes"]["rows"][0]
        po_id = f"PO-{request.entity_id}"
        with sqlite3.connect(db_path) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO purchase_orders VALUES (?, ?, ?, 'pending')",
                (po_id, request.entity_id, best["supplier_id"]),
            )
        drafted.append(request.entity_id)
        return {"po_id": po_id, "supplier_id": best["supplier_id"]}

    channels = {
        "supplier_quotes": quotes_channel(
            stock_db, params={"sku": "entity_id", "qty": "shortfall"}
        ),
        "draft_po": PythonChannel.from_callable(draft_po),
        "po_status": SqlQueryChannel(
            url=stock_db,
            query="SELECT status FROM purchase_orders WHERE po_id = :po_id",
            params={"po_id": "draft_po.po_id"},
            returns="first",
        ),
    }
    playbook = Playbook(
        name="replenish",
        entity_key="sku",
        rules=[Rule(name="short", when="shortfall > 0", workflow="reorder")],
        workflows={
            "reorder": Workflow(
                steps=[
                    Step(name="quotes", action="supplier_quotes"),
                    Step(name="draft_po", action="draft_po", when="`quotes.row_count` > 0"),
                    Step(
                        name="confirm",
                        action="po_status",
                        when="`quotes.row_count` > 0",
                        until="`confirm.status` == 'confirmed'",
                        every="1m",
                        timeout="1h",
                    ),
                ],
                on_failure="The purchase order was not confirmed",
            )
        },
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )
    # SKU-A has suppliers with stock; SKU-B's only supplier has too little; SKU-C is not short.
    frame = pd.DataFrame({"sku": ["SKU-A", "SKU-B", "SKU-C"], "shortfall": [12, 5, 0]})
    first = execute_plan(
        route(frame, playbook, partition_key="2026-12-01"),
        playbook=playbook,
        ledger=ledger,
        channels=channels,
    )
    assert first.workflows_started == 2
    assert first.workflows is not None and first.workflows.waiting == 1  # SKU-A at its poll
    assert drafted == ["SKU-A"]
    assert table_rows(stock_db, "purchase_orders") == [("PO-SKU-A", "SKU-A", "S2", "pending")]

    # A minute on, still pending: the poll waits again. Then the supplier confirms.
    clock.now += timedelta(minutes=1)
    again = advance_workflows(playbook=playbook, ledger=ledger, channels=channels)
    assert again.waiting == 1 and again.succeeded == 0
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE purchase_orders SET status = 'confirmed' WHERE po_id = 'PO-SKU-A'")
    clock.now += timedelta(minutes=1)
    done = advance_workflows(playbook=playbook, ledger=ledger, channels=channels)
    assert done.succeeded == 1 and done.waiting == 0

    instances = ledger.instances(playbook="replenish").set_index("entity_id")
    assert instances["state"].to_dict() == {"SKU-A": "succeeded", "SKU-B": "succeeded"}
    outputs = payload.loads(str(instances.loc["SKU-A", "outputs"]))
    assert outputs["quotes"]["rows"][0] == {"supplier_id": "S2", "price": 8.25, "stock": 15}
    assert outputs["quotes"]["row_count"] == 3
    assert outputs["confirm"] == {"status": "confirmed", "found": True}
    # SKU-B's quotes came back empty: the later steps were skipped, nothing was drafted for it.
    b_outputs = payload.loads(str(instances.loc["SKU-B", "outputs"]))
    assert b_outputs == {
        "quotes": {
            "rows": [],
            "row_count": 0,
            "truncated": False,
            "columns": ["supplier_id", "price", "stock"],
        }
    }
    b_log = payload.loads_value(str(instances.loc["SKU-B", "log"]))
    assert [(e["step"], e["outcome"]) for e in b_log] == [
        ("quotes", "succeeded"),
        ("draft_po", "skipped"),
        ("confirm", "skipped"),
    ]
    actions = ledger.actions(playbook="replenish")
    polls = actions[(actions["step"] == "confirm") & (actions["state"] == "succeeded")]
    assert len(polls) == 3  # pending, pending, confirmed
    assert table_rows(stock_db) == sorted(SUPPLIERS)  # the queries changed nothing
    ledger.dispose()


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def pg_tables() -> Iterator[tuple[str, str]]:
    try:
        import psycopg

        with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {str(exc).splitlines()[0]}")
    suffix = uuid.uuid4().hex[:10]
    table, sequence = f"suppliers_{suffix}", f"po_seq_{suffix}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(SUPPLIERS_DDL.replace("suppliers", table)))
        conn.execute(sa.text(f"CREATE SEQUENCE {sequence}"))
        conn.execute(
            sa.text(f"INSERT INTO {table} VALUES (:a, :b, :c, :d, :e)"),
            [dict(zip("abcde", row, strict=True)) for row in SUPPLIERS],
        )
    try:
        yield table, sequence
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            conn.execute(sa.text(f"DROP SEQUENCE IF EXISTS {sequence}"))
        engine.dispose()


@pytest.mark.postgres
def test_postgres_rows_hostile_values_and_read_only(pg_tables: tuple[str, str]) -> None:
    table, sequence = pg_tables
    ch = SqlQueryChannel(
        url=PG_URL,
        query=f"SELECT supplier_id, price, updated FROM {table} "
        "WHERE sku = :sku AND stock >= :qty ORDER BY price",
        params={"sku": "sku", "qty": "shortfall"},
        max_rows=1,
    )
    ch.validate_rows(pd.DataFrame({"sku": ["SKU-A"], "shortfall": [1]}))
    output = delivered(ch, make_request(sku="SKU-A", shortfall=10))
    # NUMERIC comes back as a number and DATE as ISO text; the third match is cut by max_rows.
    assert output["rows"] == [{"supplier_id": "S2", "price": 8.25, "updated": "2026-11-29"}]
    assert output["truncated"] is True
    hostile = delivered(ch, make_request(sku=HOSTILE, shortfall=1))
    assert [r["supplier_id"] for r in hostile["rows"]] == ["S9"]
    assert delivered(ch, make_request(sku="' OR '1'='1", shortfall=0))["rows"] == []
    # A SELECT that would change something still cannot: the transaction is read-only.
    bump = SqlQueryChannel(url=PG_URL, query=f"SELECT nextval('{sequence}') AS n")
    result = send_one(bump, make_request())
    assert isinstance(result, PermanentChannelError)
    assert "ReadOnlySqlTransaction" in str(result)
    engine = sa.create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == len(SUPPLIERS)
            assert conn.execute(sa.text(f"SELECT last_value, is_called FROM {sequence}")).one() == (
                1,
                False,
            )
    finally:
        engine.dispose()
    typo = SqlQueryChannel(url=PG_URL, query=f"SELECT pryce FROM {table}")
    with pytest.raises(ChannelConfigError, match='column "pryce" does not exist'):
        typo.validate_rows(pd.DataFrame())
