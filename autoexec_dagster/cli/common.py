"""What every ``autoexec`` command shares: the command group, the ledger option, output helpers."""

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from autoexec_dagster.dagster.ledger_resource import (
    LEDGER_FILE_NAME,
    LEDGER_URL_ENV,
    default_ledger_url,
)
from autoexec_dagster.errors import AutoexecError
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook

F = TypeVar("F", bound=Callable[..., Any])

# The playbook's default personal columns; the CLI does not know each playbook's own list.
DEFAULT_PERSONAL_COLUMNS: tuple[str, ...] = tuple(Playbook.model_fields["personal_columns"].default)


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def ledger_option(fn: F) -> F:
    return click.option(
        "--ledger",
        "ledger_url",
        envvar=LEDGER_URL_ENV,
        show_envvar=True,
        default=None,
        metavar="URL",
        help="SQLAlchemy URL of the action ledger (default: the Dagster integration's default).",
    )(fn)


def default_url() -> str:
    """The Dagster integration's default ledger, else ``var/autoexec_ledger.db`` if it exists.

    ``var/`` is where a project keeps local state (the reference deployment and ``make demo``
    write their ledger there), so ``autoexec summary`` run in the project folder finds it
    without --ledger or $AUTOEXEC_LEDGER_URL.
    """
    url = default_ledger_url()
    if os.environ.get(LEDGER_URL_ENV, "").strip():
        return url
    database = sa.make_url(url).database or ""
    local = Path.cwd() / "var" / LEDGER_FILE_NAME
    if not Path(database).exists() and local.exists():
        return f"sqlite:///{local}"
    return url


def open_ledger(ledger_url: str | None, *, must_exist: bool = True) -> ActionLedger:
    """Open the ledger; refuse to create an empty SQLite file for a command that only reads."""
    url = ledger_url or default_url()
    try:
        parsed = sa.make_url(url)
    except (ArgumentError, ValueError) as exc:
        fail(f"the ledger URL {url!r} is not a valid SQLAlchemy URL: {exc}")
    if must_exist and parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database not in ("", ":memory:") and not Path(database).exists():
            fail(
                f"no action ledger at {database} (pass --ledger URL or set {LEDGER_URL_ENV}; "
                "a ledger is created by the first execution)"
            )
    try:
        return ActionLedger(url)
    except AutoexecError as exc:
        fail(str(exc))


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table (for scripts)."
    )(fn)


def plain(value: Any) -> Any:
    """A JSON-ready value: times as ISO 8601 text, NaN and NaT as null, numpy scalars unboxed."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return None if value != value else value
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(plain(data), indent=2))


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [plain(row) for row in frame.to_dict("records")]


def table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    return frame.to_string(index=False, max_colwidth=60)


class _Group(click.Group):
    """Prints expected failures as one line, without a traceback, and exits with status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AutoexecError as exc:
            fail(str(exc))
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            fail(f"the action ledger could not be read or written: {reason}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Look at and steer autoexec_dagster's action ledger: summaries, escalations, kill switch."""
