"""Upsert one row per action into a database table (SQLAlchemy Core).

The destination row's natural key is the idempotency key (``key_column``): each send runs
``INSERT .. ON CONFLICT (key_column) DO UPDATE`` (or ``DO NOTHING``), so a resent action leaves
one row. SQLite and PostgreSQL are supported. Table and column names never enter SQL text: the
statement is built from the reflected :class:`sqlalchemy.Table`.

``columns`` maps each destination column to its source. A value containing ``{{`` or ``{%`` is a
Jinja2 template rendered in the sandbox (the result is text, so use it for text columns); any
other value names a plan column, or one of the request fields ``entity_id``, ``action``,
``playbook``, ``playbook_version``, ``insight``, ``partition_key``, ``rule``, ``idempotency_key``,
``attempt``.
"""

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal

import jinja2
import numpy as np
import pandas as pd
import sqlalchemy as sa
from pydantic import Field
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url

from autoexec_dagster.channels.base import ActionRequest, Channel, digest, resolve_secret
from autoexec_dagster.channels.templates import (
    REQUEST_FIELDS,
    compile_template,
    render,
    request_context,
    row_context,
)
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)

_DIALECTS: dict[str, Callable[[sa.Table], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}
# Threads per sender; beyond this a database gains nothing but lock contention.
_MAX_WORKERS = 64


def is_template(source: str) -> bool:
    """Whether a ``columns`` value is a Jinja2 template rather than a plan column name."""
    return "{{" in source or "{%" in source


def masked_url(raw: str) -> str:
    """The URL with its password replaced by ``***``, for messages and metadata."""
    try:
        return make_url(raw).render_as_string(hide_password=True)
    except Exception:
        return "<invalid url>"


def sql_value(value: Any) -> Any:
    """Convert a plan value to what DB-API drivers bind: numpy scalars to Python, NaN/NaT to NULL."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, pd.Timedelta):
        return value.to_pytimedelta()
    return value


def _error_summary(exc: sa_exc.DBAPIError) -> str:
    # The driver's message may quote the offending value (personal data); SQLSTATE and the
    # constraint or column name identify the problem without it.
    orig = exc.orig
    name = type(orig).__name__
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        diag = getattr(orig, "diag", None)
        parts = [f"{name} (SQLSTATE {sqlstate})"]
        for label in ("constraint_name", "column_name", "table_name"):
            value = getattr(diag, label, None) if diag is not None else None
            if value:
                parts.append(f"{label.removesuffix('_name')} {value}")
        return ", ".join(parts)
    first = str(orig).splitlines()[0] if str(orig) else ""
    return f"{name}: {first}"[:300]


def _map_db_error(exc: Exception, where: str) -> ChannelError:
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return TransientChannelError(f"{where}: {_error_summary(exc)}")
    if isinstance(exc, sa_exc.TimeoutError):
        return TransientChannelError(f"{where}: no free database connection in time")
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return TransientChannelError(f"{where}: connection lost: {_error_summary(exc)}")
        # IntegrityError, DataError, ProgrammingError, NotSupportedError: the row itself is bad.
        return PermanentChannelError(f"{where}: {_error_summary(exc)}")
    if isinstance(exc, sa_exc.StatementError):
        return PermanentChannelError(f"{where}: cannot bind a value: {type(exc.orig).__name__}")
    if isinstance(exc, OSError):
        return TransientChannelError(f"{where}: {type(exc).__name__}")
    return PermanentChannelError(f"{where}: {type(exc).__name__}")


class _SqlSender:
    def __init__(
        self,
        channel: "SqlChannel",
        engine: Engine,
        table: sa.Table,
        executor: ThreadPoolExecutor,
    ):
        self._engine = engine
        self._executor = executor
        self._key = channel.key_column
        self._where = f"SqlChannel {channel.qualified_table()}"
        self._sources = channel.sources()
        self._statement = channel.upsert_statement(engine, table)

    def params(self, request: ActionRequest) -> dict[str, Any]:
        """The bound values of one request's row."""
        context: dict[str, Any] | None = None
        params: dict[str, Any] = {self._key: request.idempotency_key}
        for dest, source in self._sources:
            if isinstance(source, jinja2.Template):
                if context is None:
                    context = request_context(request)
                try:
                    params[dest] = render(
                        source, context, what=f"{self._where} column {dest!r} template"
                    )
                except ChannelConfigError as exc:
                    raise PermanentChannelError(str(exc)) from exc
            elif source in request.data:
                params[dest] = sql_value(request.data[source])
            elif source in REQUEST_FIELDS:
                params[dest] = getattr(request, source)
            else:
                raise PermanentChannelError(
                    f"{self._where}: plan column {source!r} (for column {dest!r}) is missing"
                )
        return params

    def _execute(self, params: dict[str, Any]) -> int:
        with self._engine.begin() as conn:
            return conn.execute(self._statement, params).rowcount

    async def send(self, request: ActionRequest) -> str:
        params = self.params(request)
        loop = asyncio.get_running_loop()
        try:
            rowcount = await loop.run_in_executor(self._executor, self._execute, params)
        except Exception as exc:
            raise _map_db_error(exc, self._where) from exc
        return f"SQL upsert rowcount={rowcount}"


class SqlChannel(Channel):
    """Upsert one row per action, keyed by the idempotency key, into an existing table.

    The table must exist and ``key_column`` must be its primary key or a unique column. Runs the
    synchronous SQLAlchemy work in a thread pool sized to ``max_concurrency`` (at most 64), with a
    connection pool of the same size.
    """

    url: str = Field(
        description="SQLAlchemy URL (sqlite:/// or postgresql+psycopg://); holds credentials, "
        "so use dg.EnvVar."
    )
    table: str = Field(description="Destination table name.")
    schema_name: str | None = Field(default=None, description="Schema of the table.")
    key_column: str = Field(
        default="idempotency_key",
        description="Column that receives the idempotency key; primary key or unique.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Destination column -> plan column name, or a Jinja2 template when the "
        "value contains '{{' or '{%'.",
    )
    on_conflict: Literal["update", "nothing"] = Field(
        default="update",
        description="What a resend does to an existing row: overwrite the mapped columns, or "
        "leave the row as it is.",
    )
    timeout_seconds: float = Field(
        default=30.0, gt=0, description="Connect timeout (PostgreSQL) / busy timeout (SQLite)."
    )

    def qualified_table(self) -> str:
        """``schema.table`` or ``table``, for messages."""
        return f"{self.schema_name}.{self.table}" if self.schema_name else self.table

    def required_columns(self) -> set[str]:
        """Plan columns named in ``columns`` (request fields are always available)."""
        return {
            source
            for source in self.columns.values()
            if not is_template(source) and source not in REQUEST_FIELDS
        }

    def sources(self) -> list[tuple[str, "str | jinja2.Template"]]:
        """``(destination column, plan column or compiled template)`` pairs."""
        pairs: list[tuple[str, str | jinja2.Template]] = []
        for dest, source in self.columns.items():
            if is_template(source):
                what = f"SqlChannel {self.qualified_table()} column {dest!r} template"
                pairs.append((dest, compile_template(source, what=what)))
            else:
                pairs.append((dest, source))
        return pairs

    def _raw_url(self) -> str:
        raw = resolve_secret(self.url) or ""
        try:
            make_url(raw)
        except Exception:
            # The parser's message repeats the URL, password included; do not chain its text.
            raise ChannelConfigError("SqlChannel: url is not a valid SQLAlchemy URL") from None
        return raw

    def create_engine(self, pool_size: int = 1) -> Engine:
        """An engine for the configured URL with a pool of ``pool_size`` connections.

        Raises:
            ChannelConfigError: The URL is invalid, its variable is unset, or the dialect is not
                SQLite or PostgreSQL.
        """
        raw = self._raw_url()
        url = make_url(raw)
        dialect = url.get_backend_name()
        if dialect not in _DIALECTS:
            raise ChannelConfigError(
                f"SqlChannel: dialect {dialect!r} is not supported for upserts; "
                f"use one of {sorted(_DIALECTS)}"
            )
        kwargs: dict[str, Any] = {}
        if dialect == "sqlite":
            kwargs["connect_args"] = {"timeout": self.timeout_seconds}
            if url.database not in (None, "", ":memory:"):
                kwargs.update(pool_size=pool_size, max_overflow=0)
        else:
            kwargs["connect_args"] = {"connect_timeout": max(1, math.ceil(self.timeout_seconds))}
            kwargs.update(pool_size=pool_size, max_overflow=0)
        try:
            return sa.create_engine(url, **kwargs)
        except Exception as exc:
            raise ChannelConfigError(
                f"SqlChannel: cannot create an engine for {masked_url(raw)}: {type(exc).__name__}"
            ) from None

    def reflect(self, engine: Engine) -> sa.Table:
        """Reflect the destination table and check it can take the upserts.

        Raises:
            ChannelConfigError: Names the missing table, key column or destination column, a key
                that is not unique, or a NOT NULL column nothing fills.
        """
        where = f"SqlChannel: table {self.qualified_table()!r}"
        try:
            table = sa.Table(
                self.table, sa.MetaData(), schema=self.schema_name, autoload_with=engine
            )
        except sa_exc.NoSuchTableError:
            raise ChannelConfigError(
                f"{where} does not exist in {masked_url(str(engine.url))}"
            ) from None
        except sa_exc.DBAPIError as exc:
            raise ChannelConfigError(
                f"{where}: cannot reflect it from {masked_url(str(engine.url))}: "
                f"{_error_summary(exc)}"
            ) from None
        names = [c.name for c in table.columns]
        if self.key_column not in table.c:
            raise ChannelConfigError(
                f"{where} has no key column {self.key_column!r} (columns: {names})"
            )
        if not self._key_is_unique(table):
            raise ChannelConfigError(
                f"{where}: key column {self.key_column!r} is neither the primary key nor "
                "unique; the upsert needs one of them"
            )
        for dest in self.columns:
            if dest == self.key_column:
                raise ChannelConfigError(
                    f"{where}: column {dest!r} is the key column, which is filled with the "
                    "idempotency key; remove it from columns"
                )
            if dest not in table.c:
                raise ChannelConfigError(f"{where} has no column {dest!r} (columns: {names})")
        for column in table.columns:
            if column.name == self.key_column or column.name in self.columns:
                continue
            auto_key = (
                column.primary_key
                and len(table.primary_key.columns) == 1
                and column.autoincrement in (True, "auto")
                and isinstance(column.type, sa.Integer)
            )
            if (
                not column.nullable
                and column.server_default is None
                and not auto_key
                and not column.primary_key
            ):
                raise ChannelConfigError(
                    f"{where}: column {column.name!r} is NOT NULL without a default and "
                    "columns does not fill it"
                )
        return table

    def _key_is_unique(self, table: sa.Table) -> bool:
        key = [self.key_column]
        if [c.name for c in table.primary_key.columns] == key:
            return True
        for constraint in table.constraints:
            if (
                isinstance(constraint, sa.UniqueConstraint)
                and [c.name for c in constraint.columns] == key
            ):
                return True
        return any(
            index.unique and [c.name for c in index.columns] == key for index in table.indexes
        )

    def upsert_statement(self, engine: Engine, table: sa.Table) -> Any:
        """``INSERT .. ON CONFLICT (key) DO UPDATE | DO NOTHING`` for the engine's dialect."""
        insert = _DIALECTS[engine.dialect.name](table)
        key = table.c[self.key_column]
        updated = list(self.columns)
        if self.on_conflict == "update" and updated:
            statement = insert.on_conflict_do_update(
                index_elements=[key], set_={name: insert.excluded[name] for name in updated}
            )
        else:
            statement = insert.on_conflict_do_nothing(index_elements=[key])
        # Without it psycopg reports -1; with it, 0 tells that DO NOTHING found the key present.
        return statement.execution_options(preserve_rowcount=True)

    def validate_rows(self, rows: pd.DataFrame) -> None:
        """Reflect the table, check every mapped column, and render every template for every row.

        Raises:
            ChannelConfigError: Names the table and the column (or the row) at fault.
        """
        super().validate_rows(rows)
        sources = self.sources()
        engine = self.create_engine()
        try:
            self.reflect(engine)
        finally:
            engine.dispose()
        templates = [(d, s) for d, s in sources if isinstance(s, jinja2.Template)]
        if not templates:
            return
        has_entity = "entity_id" in rows.columns
        for index, record in zip(rows.index, rows.to_dict("records"), strict=True):
            where = f"row {index!r}"
            if has_entity:
                where += f" (entity_id {record['entity_id']!r})"
            context = row_context(record)
            for dest, template in templates:
                render(
                    template,
                    context,
                    what=f"SqlChannel {self.qualified_table()} column {dest!r} template, {where}",
                )

    @asynccontextmanager
    async def open_sender(self) -> AsyncIterator[_SqlSender]:
        """Open an engine and a thread pool for one batch."""
        workers = min(self.max_concurrency, _MAX_WORKERS)
        engine = self.create_engine(pool_size=workers)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autoexec-sql")
        try:
            loop = asyncio.get_running_loop()
            table = await loop.run_in_executor(executor, self.reflect, engine)
            yield _SqlSender(self, engine, table, executor)
        finally:
            # In a thread: a call still running (after a cancellation) must not block the loop.
            await asyncio.to_thread(executor.shutdown, wait=True)
            engine.dispose()

    def request_digest(self, request: ActionRequest) -> str:
        """Digest of key, action and destination table; never the row's values."""
        return digest(
            {
                "key": request.idempotency_key,
                "action": request.action,
                "table": self.qualified_table(),
            }
        )

    def describe(self) -> dict[str, Any]:
        """Masked URL, table, key column and column mapping; never the password."""
        try:
            where = masked_url(resolve_secret(self.url) or "")
        except ChannelConfigError:
            where = "<unset>"
        return {
            **super().describe(),
            "url": where,
            "table": self.qualified_table(),
            "key_column": self.key_column,
            "columns": dict(self.columns),
            "on_conflict": self.on_conflict,
            "max_concurrency": self.max_concurrency,
        }
