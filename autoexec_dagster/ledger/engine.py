"""Opening the action ledger: the engine, its SQLite settings, schema creation and migration.

Every database error leaves the ledger as a :class:`LedgerError` that names the operation and the
cause (with any password masked), so a caller never has to know the driver's exception types.
"""

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import StaticPool

from autoexec_dagster.errors import LedgerError
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.migrations import MIGRATIONS

DEFAULT_LEDGER_URL = "sqlite:///autoexec_ledger.db"
_READ_ONLY = "autoexec_read_only"
CHUNK = 500


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items (bounded IN lists and statements)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def now() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LedgerBase:
    """The engine of an action ledger and the transactions its parts run in.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:///ledger.db`` or
            ``postgresql+psycopg://user@host/db``. The schema is created or migrated on open.
        echo: Log SQL statements (debugging).
        clock: The time workflows are due by: a callable returning an aware datetime. Defaults to
            the real UTC time; tests pass a clock they move forward instead of sleeping.

    Raises:
        LedgerError: The URL is malformed, its driver is missing, or the database cannot be opened
            or migrated. The message masks any password.
    """

    def __init__(
        self,
        url: str = DEFAULT_LEDGER_URL,
        *,
        echo: bool = False,
        clock: Callable[[], datetime] | None = None,
    ):
        self.clock: Callable[[], datetime] = clock or now
        try:
            parsed = sa.make_url(url)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise LedgerError(
                f"the action ledger URL {url!r} is not a valid SQLAlchemy URL: {exc}"
            ) from None
        self.url = parsed
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise LedgerError(
                f"the action ledger supports SQLite and PostgreSQL, not {self.dialect!r} "
                f"({self.display_url})"
            )
        try:
            self.engine = self._create_engine(parsed, echo=echo)
            self._dbapi_error: type[BaseException] = getattr(
                self.engine.dialect.dbapi, "Error", sa_exc.DBAPIError
            )
            self._setup_schema()
        except LedgerError:
            raise
        except ModuleNotFoundError as exc:
            raise LedgerError(
                f"cannot open the action ledger at {self.display_url}: driver {exc.name!r} is not "
                "installed (for PostgreSQL: pip install 'autoexec-dagster[postgres]')"
            ) from None
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise LedgerError(
                f"cannot open the action ledger at {self.display_url}: {_reason(exc)}"
            ) from None

    def _create_engine(self, url: sa.URL, *, echo: bool) -> sa.Engine:
        if self.dialect == "postgresql":
            return sa.create_engine(url, echo=echo, pool_pre_ping=True)
        database = url.database or ""
        in_memory = database in ("", ":memory:")
        if not in_memory:
            folder = os.path.dirname(os.path.abspath(database))
            if not os.path.isdir(folder):
                raise LedgerError(
                    f"cannot open the action ledger at {self.display_url}: folder {folder!r} does "
                    "not exist"
                )
        engine = sa.create_engine(
            url,
            echo=echo,
            connect_args={"timeout": 60, "check_same_thread": False},
            poolclass=StaticPool if in_memory else None,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so every write is BEGIN IMMEDIATE:
            # a read-then-write under BEGIN DEFERRED fails with "database is locked".
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            # Reads take no write lock; WAL gives them a consistent snapshot.
            if connection.get_execution_options().get(_READ_ONLY):
                connection.exec_driver_sql("BEGIN")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def _setup_schema(self) -> None:
        try:
            schema.metadata.create_all(self.engine, checkfirst=True)
        except (sa_exc.OperationalError, sa_exc.ProgrammingError, sa_exc.IntegrityError):
            # Another process created the tables between our check and our CREATE.
            schema.metadata.create_all(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            conn.execute(
                self._insert_ignore(schema.schema_version),
                [{"id": 1, "version": schema.SCHEMA_VERSION, "migrated_at": now()}],
            )
            version = conn.execute(
                sa.select(schema.schema_version.c.version)
                .where(schema.schema_version.c.id == 1)
                .with_for_update()
            ).scalar_one()
            if version > schema.SCHEMA_VERSION:
                raise LedgerError(
                    f"the action ledger at {self.display_url} has schema version {version}, newer "
                    f"than this release supports ({schema.SCHEMA_VERSION}); upgrade autoexec-dagster"
                )
            while version < schema.SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute(
                    sa.update(schema.schema_version)
                    .where(schema.schema_version.c.id == 1)
                    .values(version=version, migrated_at=now())
                )

    @property
    def schema_version(self) -> int:
        """The schema version stored in the ledger."""
        with self._read("read the schema version") as conn:
            return conn.execute(sa.select(schema.schema_version.c.version)).scalar_one()

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_url!r})"

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except LedgerError:
            raise
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise LedgerError(
                f"the action ledger at {self.display_url} could not {what}: {_reason(exc)}"
            ) from exc
        except Exception as exc:
            if isinstance(exc, self._dbapi_error):
                raise LedgerError(
                    f"the action ledger at {self.display_url} could not {what}: {_reason(exc)}"
                ) from exc
            raise

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sa.Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); errors become LedgerError."""
        with self._guard(what), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sa.Connection]:
        """A read transaction that takes no write lock on SQLite; errors become LedgerError."""
        with (
            self._guard(what),
            self.engine.connect().execution_options(**{_READ_ONLY: True}) as conn,
            conn.begin(),
        ):
            yield conn

    def _insert_ignore(self, table: sa.Table) -> Any:
        """``INSERT .. ON CONFLICT DO NOTHING`` against any unique constraint of ``table``."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()

    def _upsert(self, table: sa.Table, key: str, values: dict[str, Any]) -> Any:
        """``INSERT .. ON CONFLICT (key) DO UPDATE``: one statement, no check-then-insert race."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement: Any = pg_insert(table).values(**values)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(table).values(**values)
        return statement.on_conflict_do_update(
            index_elements=[key], set_={k: v for k, v in values.items() if k != key}
        )
