"""The demo's local destinations: an SMTP mailbox and a CRM that takes signed webhooks.

Both stand in for real systems so the churn demo executes real actions without leaving the machine:

- :class:`SmtpSink` (from :mod:`resources.local_servers`, shared with the tests) accepts mail on
  127.0.0.1 and writes each message as an ``.eml`` file into a mailbox folder a person can open.
  The file is named after the Message-ID, so a redelivered message overwrites its first copy
  instead of adding a second.
- :class:`CrmReceiver` accepts ``POST /tasks`` with a JSON body signed the Standard Webhooks way,
  checks it with the library's :func:`~autoexec_dagster.channels.webhook.verify_signature`,
  refuses a bad signature with 401, creates each task once per ``webhook-id`` and keeps the tasks in
  the SQLite table ``crm_tasks`` a person can query. ``GET /tasks`` returns the count.

Each runs in-process on a daemon thread with its own event loop (``start()``/``stop()`` or a
``with`` block, see :class:`resources.local_servers.BackgroundServer`) and stops with its owner. Both also run as one standalone process::

    CRM_WEBHOOK_SECRET=whsec_... python -m resources.local_receivers \\
        --smtp-port 8025 --crm-port 9000 --mailbox var/mailbox --crm-db var/crm.sqlite

which prints one JSON line with the bound ports once both listen, stops cleanly on SIGTERM or
SIGINT, and stops by itself when the process that started it exits. Port 0 picks a free port.
"""

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import sqlite3
import sys
import threading
from pathlib import Path

from aiohttp import web

from resources.local_servers import (
    LOOPBACK,
    SmtpSink,
    SqliteAiohttpServer,
    add_lifetime_arguments,
    mailbox_filename,
    serve_in_foreground,
)

__all__ = ["CrmReceiver", "SmtpSink", "mailbox_filename", "main"]

DEFAULT_SECRET_ENV = "CRM_WEBHOOK_SECRET"
# Standard Webhooks recommends refusing messages whose timestamp is further than this from now.
DEFAULT_TOLERANCE_SECONDS = 300.0

log = logging.getLogger(__name__)


_CRM_SCHEMA = """
CREATE TABLE IF NOT EXISTS crm_tasks (
    task_id INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT NOT NULL UNIQUE,
    entity_id TEXT,
    action TEXT,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL
)
"""


class CrmReceiver(SqliteAiohttpServer):
    """An HTTP server on 127.0.0.1 that turns signed webhooks into CRM tasks.

    Not the tests' ``WebhookReceiver``: this one answers as a CRM would and keeps its tasks in
    SQLite for a person to query; the tests' one keeps every request in memory and injects faults.

    ``POST /tasks`` takes a JSON object signed with the Standard Webhooks headers (``webhook-id``,
    ``webhook-timestamp``, ``webhook-signature``). Answers: 201 with the new task's id; 200 with
    the existing id when the ``webhook-id`` was seen before (a redelivery creates nothing); 401
    for a missing, stale or wrong signature; 400 for a body that is not a JSON object.
    ``GET /tasks`` answers ``{"count": n}``.

    Tasks land in the SQLite table ``crm_tasks`` (task_id, webhook_id, entity_id, action,
    received_at, payload as JSON); ``entity_id`` and ``action`` are copied from the payload's
    ``entity_id`` (or ``customer_id``) and ``action`` fields when present.

    Args:
        secret: The signing secret, ``whsec_<base64>`` or a plain string.
        db_path: SQLite database file; created if missing.
        port: Port to listen on; 0 lets the OS choose.
        tolerance_seconds: Largest accepted age of ``webhook-timestamp``.
        latency_seconds: Delay added to every POST, to act like a remote system.
    """

    schema = _CRM_SCHEMA

    name = "crm-receiver"

    def __init__(
        self,
        secret: str,
        db_path: str | os.PathLike[str],
        port: int = 0,
        *,
        tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
        latency_seconds: float = 0.0,
    ) -> None:
        # Imported here, not at the top: the library pulls in Dagster (seconds), which a
        # standalone receivers process refused for its configuration should not wait for.
        from autoexec_dagster.channels.webhook import signing_key, verify_signature

        super().__init__(db_path, port)
        signing_key(secret)  # a malformed secret fails here (ValueError), not on each request
        self._secret = secret
        self._verify = verify_signature
        self.tolerance_seconds = tolerance_seconds
        self.latency_seconds = latency_seconds
        self._counts_lock = threading.Lock()
        self._counts = {"created": 0, "duplicates": 0, "rejected": 0}

    def __repr__(self) -> str:
        # Never the secret.
        return f"CrmReceiver(db_path={str(self.db_path)!r}, port={self._port})"

    @property
    def url(self) -> str:
        """The ``POST`` endpoint, e.g. ``http://127.0.0.1:9000/tasks``."""
        return f"http://{LOOPBACK}:{self.port}/tasks"

    @property
    def counts(self) -> dict[str, int]:
        """Requests answered so far: created, duplicates (redeliveries), rejected (401)."""
        with self._counts_lock:
            return dict(self._counts)

    def task_count(self) -> int:
        """Rows in ``crm_tasks``, read through a connection of the caller's own."""
        if not self.db_path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5.0)) as db:
            return int(db.execute("SELECT count(*) FROM crm_tasks").fetchone()[0])

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self._counts[outcome] += 1

    def _handler(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/tasks", self._create_task)
        app.router.add_get("/tasks", self._count_tasks)
        return app

    async def _create_task(self, request: web.Request) -> web.Response:
        body = await request.read()
        # One mapping for checking and for reading the id: with a repeated webhook-id header, the
        # id recorded must be the one the signature covers.
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not self._verify(self._secret, headers, body, tolerance_seconds=self.tolerance_seconds):
            self._count("rejected")
            error = "missing, malformed, stale or wrong Standard Webhooks signature"
            return web.json_response({"error": error}, status=401)
        webhook_id = headers["webhook-id"]
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        if not isinstance(payload, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
        if self.latency_seconds:
            await asyncio.sleep(self.latency_seconds)
        assert self._db is not None
        entity = payload.get("entity_id", payload.get("customer_id"))
        action = payload.get("action")
        inserted = self._db.execute(
            "INSERT INTO crm_tasks (webhook_id, entity_id, action, received_at, payload)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (webhook_id) DO NOTHING",
            (
                webhook_id,
                None if entity is None else str(entity),
                None if action is None else str(action),
                dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                json.dumps(payload, sort_keys=True),
            ),
        ).rowcount
        task_id = self._db.execute(
            "SELECT task_id FROM crm_tasks WHERE webhook_id = ?", (webhook_id,)
        ).fetchone()[0]
        if inserted:
            self._count("created")
            return web.json_response({"status": "created", "task_id": task_id}, status=201)
        self._count("duplicates")
        return web.json_response({"status": "duplicate", "task_id": task_id}, status=200)

    async def _count_tasks(self, request: web.Request) -> web.Response:
        assert self._db is not None
        count = self._db.execute("SELECT count(*) FROM crm_tasks").fetchone()[0]
        return web.json_response({"count": int(count)})


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resources.local_receivers",
        description="Run the demo's local SMTP mailbox and CRM webhook receiver on 127.0.0.1.",
    )
    parser.add_argument("--smtp-port", type=int, default=8025, help="0 picks a free port")
    parser.add_argument("--crm-port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--mailbox", type=Path, default=Path("var/mailbox"))
    parser.add_argument("--crm-db", type=Path, default=Path("var/crm.sqlite"))
    parser.add_argument(
        "--crm-secret-env",
        default=DEFAULT_SECRET_ENV,
        help="environment variable holding the webhook signing secret (never pass it as an "
        "argument: arguments are visible to every user of the machine)",
    )
    parser.add_argument("--crm-latency-ms", type=float, default=0.0)
    add_lifetime_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run both receivers until SIGTERM, SIGINT or the parent's exit.

    Stops when ``--owner-pid`` exits or, with ``--exit-with-parent`` (the default), when the
    process is re-parented because its parent exited. Prints one JSON line to stdout once both
    listen: ``smtp_port``, ``crm_port``, ``crm_url``,
    ``mailbox``, ``crm_db`` and ``pid``.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 after a clean stop, 2 when the configuration is unusable.
    """
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    secret = os.environ.get(args.crm_secret_env)
    if not secret:
        print(f"error: set the webhook secret in ${args.crm_secret_env}", file=sys.stderr)
        return 2
    try:
        # Only filed: a sink that runs for days must not hold every message in memory too.
        smtp = SmtpSink(args.mailbox, port=args.smtp_port, keep_messages=False)
        crm = CrmReceiver(
            secret, args.crm_db, port=args.crm_port, latency_seconds=args.crm_latency_ms / 1000
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return serve_in_foreground(
        [smtp, crm],
        ready=lambda: {
            "smtp_port": smtp.port,
            "crm_port": crm.port,
            "crm_url": crm.url,
            "mailbox": str(args.mailbox.resolve()),
            "crm_db": str(args.crm_db.resolve()),
            "pid": os.getpid(),
        },
        what="receivers",
        exit_with_parent=args.exit_with_parent,
        owner_pid=args.owner_pid,
    )


if __name__ == "__main__":
    sys.exit(main())
