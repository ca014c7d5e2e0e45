"""Read rows from a database for a workflow step: a fixed query whose rows are the step's output.

The query is configuration, one ``SELECT`` (or ``WITH .. SELECT``) statement with ``:name`` bind
parameters. ``params`` maps each parameter to where its value comes from, and the values are bound
by the driver, never formatted into the SQL text:

- a plan column (``"sku"``), checked by :meth:`SqlQueryChannel.validate_rows` before anything runs;
- a request field (``entity_id``, ``partition_key``, ``rule``, ..; see
  :data:`~autoexec_dagster.channels.templates.REQUEST_FIELDS`);
- an earlier step's output field, written ``"<step>.<field>"`` (``"draft_po.po_id"``), as
  ``when``/``until`` read it; it is checked when the step runs, because no plan holds it.

A query is not a side effect, so a query step may be retried and re-run freely: connection
failures are transient (retried), SQL errors permanent. The channel keeps to reads twice over: the
statement is refused at construction unless it is one SELECT, and every connection is opened
read-only (``PRAGMA query_only`` on SQLite, ``READ ONLY`` transactions on PostgreSQL), so a
function with a side effect fails too.

The step's output (``returns``), read by later steps as ``<step>.<field>``:

- ``"rows"``: ``{"rows": [{column: value}, ..], "row_count": n, "truncated": bool, "columns": [..]}``
  with at most ``max_rows`` rows (``truncated`` says more matched, or the rows were cut to keep the
  output within the ledger's 16 KiB bound);
- ``"first"``: the first row's columns as fields plus ``found`` (``{"status": "confirmed",
  "found": true}``); without a row every column is null and ``found`` is false, so a poll such as
  ``until="`confirm.status` == 'confirmed'"`` reads its field either way.

Values are made JSON-able: dates and times become ISO-8601 text, decimals numbers, durations
seconds, bytes hexadecimal text, NaN null.
"""

import asyncio
import datetime as dt
import itertools
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
import pandas as pd
import sqlalchemy as sa
from pydantic import Field
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url

from autoexec_dagster.channels.base import (
    ActionRequest,
    Channel,
    Delivered,
    Delivery,
    digest,
    resolve_secret,
)
from autoexec_dagster.channels.sql import _error_summary, _map_db_error, masked_url, sql_value
from autoexec_dagster.channels.templates import REQUEST_FIELDS
from autoexec_dagster.errors import ChannelConfigError, ChannelError, PermanentChannelError
from autoexec_dagster.ledger.payload import MAX_OUTPUT_BYTES, dumps
from autoexec_dagster.routing import PLAN_COLUMNS

Returns = Literal["rows", "first"]

# Threads per sender; beyond this a database gains nothing but lock contention (as in sql.py).
_MAX_WORKERS = 64
# Other statements (CREATE, PRAGMA, COPY..) are refused by the first word; inside a SELECT only
# these write: a data-modifying CTE (PostgreSQL) or SELECT .. INTO, which creates a table.
_WRITE_WORDS = frozenset({"DELETE", "INSERT", "INTO", "MERGE", "UPDATE"})
# FOR UPDATE and FOR NO KEY UPDATE are caught as UPDATE; FOR SHARE and FOR KEY SHARE lock too.
_LOCK_AFTER_FOR = frozenset({"SHARE", "KEY"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
# SQLite result codes (primary, low byte) that no retry can fix: SQL errors, a write refused by
# query_only, a type mismatch, misuse, a parameter out of range. Others (busy, locked, I/O) pass.
_SQLITE_PERMANENT = frozenset({1, 8, 20, 21, 25})
# Plan columns that routing adds and requests do not carry (the others are request fields).
_PLAN_ONLY = frozenset(PLAN_COLUMNS) - {"entity_id", *REQUEST_FIELDS}
_BINDABLE = (str, int, float, bool, Decimal, dt.date, dt.time, dt.timedelta, bytes, uuid.UUID)


def _skip_quoted(query: str, start: int, quote: str, *, backslash: bool = False) -> int:
    """Index just past the literal or identifier opened at ``start``; -1 if it never closes."""
    i = start + 1
    while i < len(query):
        char = query[i]
        if backslash and char == "\\":
            i += 2
            continue
        if char == quote:
            if query.startswith(quote * 2, i):  # '' and "" escape the quote
                i += 2
                continue
            return i + 1
        i += 1
    return -1


def _skip_block_comment(query: str, start: int) -> int:
    """Index just past the ``/* .. */`` comment at ``start`` (nesting, as PostgreSQL does)."""
    depth, i = 0, start
    while i < len(query) - 1:
        pair = query[i : i + 2]
        if pair == "/*":
            depth, i = depth + 1, i + 2
        elif pair == "*/":
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def sql_words(query: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of a statement outside literals, quoted names and comments, and its semicolons.

    Words after ``:`` (bind parameter names) or ``.`` (qualified names) are not keywords and are
    left out. Words are upper-cased; each semicolon is given as ``(its index in the text, the
    number of words before it)``.

    Raises:
        ChannelConfigError: A literal, quoted name or comment is not closed.
    """
    words: list[str] = []
    semicolons: list[tuple[int, int]] = []
    i, n = 0, len(query)
    while i < n:
        char = query[i]
        end = i + 1
        if char in "'\"`":
            end = _skip_quoted(query, i, char)
        elif query.startswith("--", i):
            newline = query.find("\n", i)
            end = n if newline < 0 else newline + 1
        elif query.startswith("/*", i):
            end = _skip_block_comment(query, i)
        elif char == "$" and (tag := _DOLLAR_TAG.match(query, i)):
            close = query.find(tag.group(), tag.end())
            end = -1 if close < 0 else close + len(tag.group())
        elif char == ";":
            semicolons.append((i, len(words)))
        elif word := _WORD.match(query, i):
            end = word.end()
            if word.group() in ("E", "e") and query.startswith("'", end):
                # PostgreSQL's E'..' literal: a backslash escapes the quote.
                end = _skip_quoted(query, end, "'", backslash=True)
            elif i == 0 or query[i - 1] not in ":.":
                words.append(word.group().upper())
        if end < 0:
            raise ChannelConfigError(
                "SqlQueryChannel: query has a literal, quoted name or comment that is not closed"
            )
        i = end
    return words, semicolons


def read_only_problem(query: str) -> str | None:
    """Why ``query`` is not one read-only SELECT statement, or None when it is."""
    words, semicolons = sql_words(query)
    if not words:
        return "the query is empty"
    if len(semicolons) > 1 or any(count < len(words) for _, count in semicolons):
        return "it holds more than one statement"
    if words[0] not in ("SELECT", "WITH"):
        return f"it starts with {words[0]}"
    writes = sorted({w for w in words if w in _WRITE_WORDS})
    if writes:
        return f"it contains {', '.join(writes)}, which writes or locks rows"
    if any(a == "FOR" and b in _LOCK_AFTER_FOR for a, b in itertools.pairwise(words)):
        return "it locks rows (FOR SHARE / FOR KEY SHARE)"
    return None


def json_value(value: Any) -> Any:
    """A database value as JSON-able data (ISO-8601 text for dates, numbers for decimals)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        exponent = value.as_tuple().exponent
        # Whole numbers stay exact; others become floats so conditions compare them as numbers.
        return int(value) if isinstance(exponent, int) and exponent >= 0 else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_value(v) for v in value]
    return str(value)


def _on_connect(dialect: str, timeout_seconds: float) -> Callable[[Any, Any], None]:
    """A ``connect`` event handler that makes every new connection read-only."""

    def read_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if dialect == "sqlite":
                cursor.execute("PRAGMA query_only = ON")
            else:
                cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                # A query that never ends would hold one of the sender's threads for good.
                cursor.execute(f"SET statement_timeout = {int(timeout_seconds * 1000)}")
        finally:
            cursor.close()
        dbapi_connection.commit()

    return read_only


def _map_query_error(exc: Exception, where: str) -> ChannelError:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlite_errorcode", None)
    if (
        isinstance(exc, sa_exc.DBAPIError)
        and code is not None
        and (code & 0xFF) in _SQLITE_PERMANENT
    ):
        # SQLite reports a missing table or a syntax error as OperationalError; retrying the same
        # statement cannot fix it.
        return PermanentChannelError(f"{where}: {_error_summary(exc)}")
    return _map_db_error(exc, where)


def _validation_detail(exc: sa_exc.DBAPIError) -> str:
    # Validation binds only NULLs, so the server's own message holds no entity value; it names
    # the table or column at fault, which is what the person configuring the query needs.
    summary = _error_summary(exc)
    primary = getattr(getattr(exc.orig, "diag", None), "message_primary", None)
    return f"{summary}: {primary}" if primary else summary


class _QuerySender:
    def __init__(self, channel: "SqlQueryChannel", engine: Engine, executor: ThreadPoolExecutor):
        self._engine = engine
        self._executor = executor
        self._params = dict(channel.params)
        self._returns = channel.returns
        self._max_rows = channel.max_rows
        self._statement = channel.statement()
        self._where = f"SqlQueryChannel {masked_url(str(engine.url))}"

    def bind(self, request: ActionRequest) -> dict[str, Any]:
        """The bound values of one request's parameters.

        Raises:
            PermanentChannelError: A source is missing from the request (naming the fields that
                exist) or its value is not one scalar.
        """
        values: dict[str, Any] = {}
        for name, source in self._params.items():
            value = self._value(request, name, source)
            if value is not None and not isinstance(value, _BINDABLE):
                raise PermanentChannelError(
                    f"{self._where}: parameter :{name} (from {source!r}) is a "
                    f"{type(value).__name__}; a bind parameter takes one scalar value"
                )
            values[name] = value
        return values

    def _value(self, request: ActionRequest, name: str, source: str) -> Any:
        data = request.data
        if source in data and source != "steps":
            return sql_value(data[source])
        if source in REQUEST_FIELDS:
            return getattr(request, source)
        step, dot, field = source.partition(".")
        if not dot:
            columns = sorted(str(k) for k in data if k != "steps")
            raise PermanentChannelError(
                f"{self._where}: parameter :{name} reads column {source!r}, which the request "
                f"does not have (columns: {columns})"
            )
        outputs = data.get("steps")
        outputs = outputs if isinstance(outputs, Mapping) else {}
        output = outputs.get(step)
        if not isinstance(output, Mapping):
            raise PermanentChannelError(
                f"{self._where}: parameter :{name} reads {source!r}, but step {step!r} has no "
                f"output (steps with output: {sorted(outputs)})"
            )
        if field not in output:
            raise PermanentChannelError(
                f"{self._where}: parameter :{name} reads {source!r}, but the output of step "
                f"{step!r} has no field {field!r}; it has {sorted(output)}"
            )
        return sql_value(output[field])

    def _execute(self, values: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        limit = 1 if self._returns == "first" else self._max_rows + 1
        with self._engine.connect() as conn:
            # A server-side cursor on PostgreSQL: a query matching a million rows sends `limit`.
            result = conn.execution_options(yield_per=limit).execute(self._statement, values)
            try:
                return list(result.keys()), [tuple(row) for row in result.fetchmany(limit)]
            finally:
                result.close()

    async def send(self, request: ActionRequest) -> Delivered:
        values = self.bind(request)
        loop = asyncio.get_running_loop()
        try:
            columns, rows = await loop.run_in_executor(self._executor, self._execute, values)
        except Exception as exc:
            raise _map_query_error(exc, self._where) from exc
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise PermanentChannelError(
                f"{self._where}: the query returns column(s) {repeated} more than once; give "
                "each a distinct name (AS ..), the output is keyed by column"
            )
        if self._returns == "first":
            return self._first(columns, rows)
        return self._rows(columns, rows)

    def _first(self, columns: list[str], rows: list[tuple[Any, ...]]) -> Delivered:
        if "found" in columns:
            raise PermanentChannelError(
                f"{self._where}: the query returns a column named 'found', which returns='first' "
                "sets itself; name it differently (AS ..)"
            )
        found = bool(rows)
        values = rows[0] if found else (None,) * len(columns)
        output: dict[str, Any] = {c: json_value(v) for c, v in zip(columns, values, strict=True)}
        output["found"] = found
        size = len(dumps(output).encode())
        if size > MAX_OUTPUT_BYTES:
            raise PermanentChannelError(
                f"{self._where}: the first row is {size} bytes as JSON, more than a step output "
                f"may hold ({MAX_OUTPUT_BYTES}); select fewer or shorter columns"
            )
        return Delivered(
            receipt="SQL query: found" if found else "SQL query: no row", output=output
        )

    def _rows(self, columns: list[str], rows: list[tuple[Any, ...]]) -> Delivered:
        truncated = len(rows) > self._max_rows
        records = [
            {c: json_value(v) for c, v in zip(columns, row, strict=True)}
            for row in rows[: self._max_rows]
        ]
        # Keep as many rows as fit the ledger's bound, so later steps read rows, not a marker.
        envelope = len(
            dumps(
                {"rows": [], "row_count": len(records), "truncated": True, "columns": columns}
            ).encode()
        )
        budget, kept = MAX_OUTPUT_BYTES - envelope, 0
        for record in records:
            budget -= len(dumps(record).encode()) + (1 if kept else 0)
            if budget < 0:
                break
            kept += 1
        if kept < len(records):
            records, truncated = records[:kept], True
        output = {
            "rows": records,
            "row_count": len(records),
            "truncated": truncated,
            "columns": columns,
        }
        receipt = f"SQL query: {len(records)} row(s)" + (" (truncated)" if truncated else "")
        return Delivered(receipt=receipt, output=output)


class SqlQueryChannel(Channel):
    """Run a fixed, read-only query per action attempt; its rows are the step's output.

    The configuration is checked at construction: the query must be one SELECT statement, every
    ``:name`` in it needs a source in ``params`` and every source must be used. Runs the
    synchronous SQLAlchemy work in a thread pool sized to ``max_concurrency`` (at most 64), with
    a connection pool of the same size.
    """

    url: str = Field(
        description="SQLAlchemy URL (sqlite:/// or postgresql+psycopg://); holds credentials, "
        "so use dg.EnvVar."
    )
    query: str = Field(
        description="One SELECT (or WITH .. SELECT) statement with :name bind parameters; "
        "write \\: for a literal colon before a name."
    )
    params: dict[str, str] = Field(
        default_factory=dict,
        description="Bind parameter name -> source: a plan column, a request field "
        "(entity_id, partition_key, ..) or an earlier step's output field '<step>.<field>'.",
    )
    returns: Returns = Field(
        default="rows",
        description="rows: {rows, row_count, truncated, columns}; first: the first row's "
        "columns plus found.",
    )
    max_rows: int = Field(
        default=100, ge=1, le=10_000, description="Most rows kept in the output (returns=rows)."
    )
    timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Connect and statement timeout (PostgreSQL) / busy timeout (SQLite).",
    )
    delivery: Delivery = Field(
        default="at_least_once",
        description="A query has no side effect, so one left in doubt by a crash is simply run "
        "again (at_least_once); at_most_once would escalate a harmless read to a person.",
    )

    def __init__(self, **data: Any) -> None:
        """Build the channel and check its configuration.

        Raises:
            ChannelConfigError: The query is not one SELECT, a bind parameter has no source, a
                source is unused or empty, or the URL is invalid or of an unsupported dialect.
        """
        super().__init__(**data)
        self.check_config()

    def check_config(self) -> None:
        """Check the query, its parameters and (unless it is a ``dg.EnvVar``) the URL.

        Raises:
            ChannelConfigError: Names the problem and how to fix it.
        """
        problem = read_only_problem(self.query)
        if problem:
            raise ChannelConfigError(
                "SqlQueryChannel: query must be one SELECT statement (WITH .. SELECT included): "
                "a query step only reads, which is what lets it be retried and re-run freely; "
                f"{problem}"
            )
        bound = self.bind_names()
        unbound = [name for name in bound if name not in self.params]
        if unbound:
            raise ChannelConfigError(
                f"SqlQueryChannel: query parameter(s) {[':' + n for n in unbound]} have no "
                f"source in params (params: {sorted(self.params)})"
            )
        unused = sorted(set(self.params) - set(bound))
        if unused:
            raise ChannelConfigError(
                f"SqlQueryChannel: params {unused} are not used by the query (it binds "
                f"{[':' + n for n in bound] or 'nothing'})"
            )
        empty = sorted(name for name, source in self.params.items() if not source.strip())
        if empty:
            raise ChannelConfigError(f"SqlQueryChannel: params {empty} name no source")
        if not isinstance(self.url, dg.EnvVar):
            self._dialect(self.url)

    def sql(self) -> str:
        """The query as executed: without a trailing semicolon (and what follows it, comments)."""
        _, semicolons = sql_words(self.query)
        # A statement ends at its semicolon; PostgreSQL's DECLARE .. CURSOR FOR takes none.
        end = semicolons[0][0] if semicolons else len(self.query)
        return self.query[:end].strip()

    def bind_names(self) -> list[str]:
        """The ``:name`` bind parameters of the query, in order of appearance."""
        return list(sa.text(self.sql()).compile().params)

    def statement(self) -> sa.TextClause:
        """The query as a SQLAlchemy text clause whose parameters are bound, never formatted."""
        return sa.text(self.sql())

    def required_columns(self) -> set[str]:
        """Plan columns the parameters read (request fields and step outputs are not columns)."""
        return {
            source
            for source in self.params.values()
            if source not in REQUEST_FIELDS and "." not in source
        }

    @staticmethod
    def _dialect(raw: str) -> str:
        try:
            url = make_url(raw)
        except Exception:
            # The parser's message repeats the URL, password included; do not chain its text.
            raise ChannelConfigError("SqlQueryChannel: url is not a valid SQLAlchemy URL") from None
        dialect = url.get_backend_name()
        if dialect not in ("sqlite", "postgresql"):
            raise ChannelConfigError(
                f"SqlQueryChannel: dialect {dialect!r} is not supported: read-only connections "
                "are enforced for 'postgresql' and 'sqlite' only"
            )
        return dialect

    def create_engine(self, pool_size: int = 1) -> Engine:
        """A read-only engine for the configured URL with a pool of ``pool_size`` connections.

        Raises:
            ChannelConfigError: The URL is invalid, its variable is unset, or the dialect is not
                SQLite or PostgreSQL.
        """
        raw = resolve_secret(self.url) or ""
        dialect = self._dialect(raw)
        url = make_url(raw)
        kwargs: dict[str, Any] = {}
        if dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": self.timeout_seconds}
            if url.database not in (None, "", ":memory:"):
                if not url.database.startswith("file:") and not Path(url.database).is_file():
                    # sqlite3 would create an empty file there, a side effect of a mistyped path.
                    raise ChannelConfigError(
                        f"SqlQueryChannel: SQLite database {masked_url(raw)} does not exist"
                    )
                kwargs.update(pool_size=pool_size, max_overflow=0)
        else:
            kwargs["connect_args"] = {"connect_timeout": max(1, math.ceil(self.timeout_seconds))}
            kwargs.update(pool_size=pool_size, max_overflow=0)
        try:
            engine = sa.create_engine(url, **kwargs)
        except Exception as exc:
            raise ChannelConfigError(
                f"SqlQueryChannel: cannot create an engine for {masked_url(raw)}: "
                f"{type(exc).__name__}"
            ) from None
        event.listen(engine, "connect", _on_connect(dialect, self.timeout_seconds))
        return engine

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """Check that every parameter's column is in the plan and that the query compiles.

        The query is checked with ``EXPLAIN`` and every parameter NULL, so nothing is run.

        Raises:
            ChannelConfigError: Names the parameter and the missing column, or the database's
                objection to the query (a missing table or column), or why it cannot be reached.
        """
        available = {str(c) for c in rows.columns} - _PLAN_ONLY
        for name, source in sorted(self.params.items()):
            if source in self.required_columns() and source not in available:
                raise ChannelConfigError(
                    f"SqlQueryChannel: parameter :{name} reads column {source!r}, which the plan "
                    f"does not have (columns: {sorted(available)[:50]})"
                )
        engine = self.create_engine()
        where = masked_url(str(engine.url))
        try:
            with engine.connect() as conn:
                conn.execute(
                    sa.text(f"EXPLAIN {self.sql()}"), dict.fromkeys(self.bind_names())
                ).fetchall()
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            code = getattr(exc.orig, "sqlite_errorcode", None)
            if code is not None and (code & 0xFF) in _SQLITE_PERMANENT:
                raise ChannelConfigError(
                    f"SqlQueryChannel: the query does not run against {where}: "
                    f"{_validation_detail(exc)}"
                ) from None
            raise ChannelConfigError(
                f"SqlQueryChannel: cannot check the query against {where}: "
                f"{_validation_detail(exc)}"
            ) from None
        except sa_exc.DBAPIError as exc:
            raise ChannelConfigError(
                f"SqlQueryChannel: the query does not run against {where}: "
                f"{_validation_detail(exc)}"
            ) from None
        finally:
            engine.dispose()

    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_QuerySender]:
        """Open a read-only engine and a thread pool for one batch."""
        workers = min(self.max_concurrency, _MAX_WORKERS)
        engine = self.create_engine(pool_size=workers)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autoexec-query")
        try:
            yield _QuerySender(self, engine, executor)
        finally:
            # In a thread: a call still running (after a cancellation) must not block the loop.
            await asyncio.to_thread(executor.shutdown, wait=True)
            engine.dispose()

    def request_digest(self, request: ActionRequest) -> str:
        """Digest of key, action and the query as configured; never the bound values."""
        return digest(
            {
                "key": request.idempotency_key,
                "action": request.action,
                "query": self.sql(),
                "params": dict(self.params),
                "returns": self.returns,
            }
        )

    def describe(self) -> dict[str, Any]:
        """Masked URL, query, parameter sources and output shape; never the password."""
        try:
            where = masked_url(resolve_secret(self.url) or "")
        except ChannelConfigError:
            where = "<unset>"
        return {
            **super().describe(),
            "url": where,
            "query": self.sql(),
            "params": dict(self.params),
            "returns": self.returns,
            "max_rows": self.max_rows,
            "max_concurrency": self.max_concurrency,
        }
