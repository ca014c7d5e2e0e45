"""Where the action ledger lives, and how Dagster code opens it.

The ledger is deliberately not bound as a Dagster resource: a resource key such as ``"ledger"``
could collide with one the user binds, and a URL in resource configuration would show its
password in the UI. The execution ops close over a :class:`LedgerHandle` instead, which opens
the ledger on first use, once per process.

Without an explicit ledger, the Dagster integration and the ``autoexec`` CLI agree on one default
(:func:`default_ledger_url`), so ``autoexec summary`` finds what a run wrote without arguments.
"""

import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from autoexec_dagster.errors import LedgerError
from autoexec_dagster.ledger.action_ledger import ActionLedger

LEDGER_URL_ENV = "AUTOEXEC_LEDGER_URL"
LEDGER_FILE_NAME = "autoexec_ledger.db"


def default_ledger_url() -> str:
    """The ledger URL used when none is given.

    Returns:
        ``$AUTOEXEC_LEDGER_URL`` when set; otherwise a SQLite file ``autoexec_ledger.db`` in
        ``$DAGSTER_HOME`` when set, else in the current directory (as an absolute path, so a
        process that changes directory later still finds the same file).
    """
    configured = os.environ.get(LEDGER_URL_ENV, "").strip()
    if configured:
        return configured
    home = os.environ.get("DAGSTER_HOME", "").strip()
    folder = Path(home) if home else Path.cwd()
    return f"sqlite:///{(folder / LEDGER_FILE_NAME).absolute()}"


def display_url(url: str) -> str:
    """The URL with any password masked, for logs and metadata.

    Raises:
        LedgerError: The URL is not a valid SQLAlchemy URL.
    """
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError) as exc:
        raise LedgerError(f"the action ledger URL is not a valid SQLAlchemy URL: {exc}") from None


class FileClock:
    """A workflow clock another process moves: the time is read from a file of ISO 8601 text.

    For demos and tests of a whole deployment (sensor ticks, run workers and the demo driver in
    separate processes) that must agree on an injected time. While the file is missing or empty,
    the real UTC time is used. Not for production: there the ledger keeps the real time.

    Args:
        path: The file; a naive time in it is taken as UTC.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __call__(self) -> datetime:
        """The time in the file, or the real UTC time while there is none.

        Raises:
            LedgerError: The file holds text that is not an ISO 8601 time.
        """
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if not text:
            return datetime.now(UTC)
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise LedgerError(
                f"the ledger clock file {self.path} holds {text[:40]!r}, not an ISO 8601 time"
            ) from None
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    def __repr__(self) -> str:
        return f"FileClock({str(self.path)!r})"


class LedgerHandle:
    """Opens the action ledger on first use, once per process.

    Opening is deferred because building Definitions must not touch a database: code servers and
    ``dg check`` load definitions where the ledger may be unreachable, and a SQLite default would
    create files wherever definitions happen to be imported. The execution runs, the insight
    sensor and the workflow sensor all open the ledger through the same handle, so they agree on
    its URL and on its clock.

    Args:
        source: An open :class:`ActionLedger` (used as is), a SQLAlchemy URL, or None for
            :func:`default_ledger_url` (resolved at first use, in the process that executes).
        clock: The time workflows are due by, for a ledger this handle opens (default: the real
            UTC time). A :class:`FileClock` lets a demo or test move time for every process of a
            deployment; an open ActionLedger brings its own clock instead.

    Raises:
        LedgerError: ``source`` is a malformed URL, or a clock is given with an open ledger.
    """

    def __init__(
        self,
        source: ActionLedger | str | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ):
        if source is not None and not isinstance(source, ActionLedger | str):
            raise LedgerError(
                f"ledger must be an ActionLedger, a SQLAlchemy URL or None, got "
                f"{type(source).__name__}"
            )
        if clock is not None and isinstance(source, ActionLedger):
            raise LedgerError(
                "ledger_clock applies to a ledger opened from a URL; an open ActionLedger keeps "
                "its own clock (pass ActionLedger(url, clock=...) instead)"
            )
        self._ledger = source if isinstance(source, ActionLedger) else None
        self._url = source if isinstance(source, str) else None
        self._clock = clock
        if self._url is not None:
            display_url(self._url)  # fail at definition time on a malformed URL
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        """The ledger URL with its password masked, or how the default will be chosen."""
        if self._ledger is not None:
            return self._ledger.display_url
        if self._url is not None:
            return display_url(self._url)
        return f"default (${LEDGER_URL_ENV}, else {LEDGER_FILE_NAME} in $DAGSTER_HOME or cwd)"

    def get(self) -> ActionLedger:
        """The open ledger.

        Raises:
            LedgerError: The ledger cannot be opened or migrated.
        """
        with self._lock:
            if self._ledger is None:
                self._ledger = ActionLedger(self._url or default_ledger_url(), clock=self._clock)
            return self._ledger

    def __repr__(self) -> str:
        return f"LedgerHandle({self.description!r})"
