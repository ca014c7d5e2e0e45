"""The demo's local destinations: an SMTP mailbox and a CRM that takes signed webhooks.

Both stand in for real systems so the churn demo executes real actions without leaving the machine:

- :class:`SmtpSink` accepts mail on 127.0.0.1 and writes each message as an ``.eml`` file into a
  mailbox folder a person can open. The file is named after the Message-ID, so a redelivered
  message overwrites its first copy instead of adding a second.
- :class:`CrmReceiver` accepts ``POST /tasks`` with a JSON body signed the Standard Webhooks way,
  refuses a bad signature with 401, creates each task once per ``webhook-id`` and keeps the tasks in
  the SQLite table ``crm_tasks`` a person can query. ``GET /tasks`` returns the count.

Each runs in-process on a daemon thread with its own event loop (``start()``/``stop()`` or a
``with`` block) and stops with its owner. Both also run as one standalone process::

    CRM_WEBHOOK_SECRET=whsec_... python -m resources.local_receivers \\
        --smtp-port 8025 --crm-port 9000 --mailbox var/mailbox --crm-db var/crm.sqlite

which prints one JSON line with the bound ports once both listen, stops cleanly on SIGTERM or
SIGINT, and stops by itself when the process that started it exits. Port 0 picks a free port.
"""

import argparse
import asyncio
import atexit
import base64
import binascii
import contextlib
import datetime as dt
import email.parser
import email.policy
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

LOOPBACK = "127.0.0.1"
DEFAULT_SECRET_ENV = "CRM_WEBHOOK_SECRET"
# Standard Webhooks recommends refusing messages whose timestamp is further than this from now.
DEFAULT_TOLERANCE_SECONDS = 300.0

log = logging.getLogger(__name__)


class WebhookVerificationError(Exception):
    """A webhook request's signature headers are missing, malformed, stale or wrong."""


def _secret_bytes(secret: str) -> bytes:
    """Decode a Standard Webhooks secret: ``whsec_<base64>``, or any other string as UTF-8.

    Raises:
        ValueError: The secret is empty, or its ``whsec_`` part is not base64.
    """
    if secret.startswith("whsec_"):
        encoded = secret.removeprefix("whsec_")
        try:
            # Padding is optional in the wild; accept both forms, as senders do.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as error:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from error
    else:
        key = secret.encode()
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign_webhook(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Sign a webhook the Standard Webhooks way.

    Args:
        secret: ``whsec_<base64>`` or a plain string.
        webhook_id: Value of the ``webhook-id`` header.
        timestamp: Value of the ``webhook-timestamp`` header, in Unix seconds.
        body: The exact request body.

    Returns:
        The ``webhook-signature`` header value, ``v1,<base64 HMAC-SHA256>``.
    """
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    mac = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> str:
    """Verify the Standard Webhooks signature of a request.

    Args:
        secret: ``whsec_<base64>`` or a plain string.
        headers: Request headers; lookups must be case-insensitive as in HTTP (aiohttp's are).
        body: The exact request body.
        tolerance_seconds: Largest accepted distance between the timestamp and now (replays).
        now: The current Unix time; the clock when None.

    Returns:
        The verified ``webhook-id``.

    Raises:
        WebhookVerificationError: A header is missing or malformed, the timestamp is out of
            tolerance, or no ``v1`` signature matches.
    """
    webhook_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not webhook_id or not timestamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_seconds:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    expected = sign_webhook(secret, webhook_id, sent_at, body)
    # The header may carry several space-separated signatures while a secret is being rotated.
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate, expected):
            return webhook_id
    raise WebhookVerificationError("no matching v1 signature")


class _BackgroundServer:
    """An asyncio server on its own daemon thread, bound to 127.0.0.1.

    Subclasses implement ``_open`` (bind and return the port) and ``_close``.
    """

    name = "server"

    def __init__(self, port: int = 0) -> None:
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def host(self) -> str:
        """The address listened on: always the loopback address."""
        return LOOPBACK

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when constructed with port 0).

        Raises:
            RuntimeError: The server has not been started.
        """
        if self._port is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the server thread is alive and listening."""
        return self._port is not None and self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> Self:
        """Start listening on a daemon thread; return once the port is bound.

        Args:
            timeout: Seconds to wait for the server to bind.

        Returns:
            The server itself, to chain ``SmtpSink(...).start()``.

        Raises:
            RuntimeError: Already started, or the server did not come up in time.
            OSError: The port could not be bound (for example, in use).
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already started")
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, name=f"autoexec-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name} did not start within {timeout} s")
        if self._failure is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._failure
        # A daemon thread is frozen at interpreter exit; stopping first lets files and the
        # database close cleanly when the owner forgets to.
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and wait for the thread to end. Safe to call more than once."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        atexit.unregister(self.stop)
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        self._thread = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:
            if self._ready.is_set():
                log.exception("%s failed", self.name)
            else:
                # Handed to the thread waiting in start(), which re-raises it.
                self._failure = error
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            self._port = await self._open(self._requested_port)
        except BaseException:
            # Whatever _open got to (a database, a half-set-up runner) is released here.
            await self._close()
            raise
        log.info("%s listening on %s:%d", self.name, LOOPBACK, self._port)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._close()
            log.info("%s stopped", self.name)

    async def _open(self, port: int) -> int:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._@+=-]")


def mailbox_filename(message_id: str | None, content: bytes) -> str:
    """The mailbox file name of a message: its Message-ID made safe for a file system.

    Args:
        message_id: The Message-ID header, with or without angle brackets; None when absent.
        content: The raw message, hashed when there is no Message-ID.

    Returns:
        A name ending in ``.eml``. Equal Message-IDs give equal names; a short hash of the
        original is appended whenever characters had to be replaced or cut, so two distinct
        Message-IDs never share a file.
    """
    if not message_id or not message_id.strip("<> \t\r\n"):
        return "no-message-id-" + hashlib.sha256(content).hexdigest()[:32] + ".eml"
    raw = message_id.strip().removeprefix("<").removesuffix(">")
    safe = _UNSAFE_FILENAME.sub("_", raw)[:120].lstrip(".")
    if safe != raw:
        safe += "-" + hashlib.sha256(raw.encode()).hexdigest()[:12]
    return safe + ".eml"


class _MailboxHandler:
    """aiosmtpd handler that writes each accepted message into the mailbox folder."""

    def __init__(self, mailbox: Path) -> None:
        self.mailbox = mailbox
        self.lock = threading.Lock()
        self.deliveries = 0
        self.redeliveries = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode()
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content)
        path = self.mailbox / mailbox_filename(headers.get("Message-ID"), content)
        existed = path.exists()
        # Written aside and renamed: a person opening the folder never sees half a message, and
        # a redelivery replaces the file in one step.
        partial = path.with_name(f".{path.name}.{threading.get_ident()}.partial")
        partial.write_bytes(content)
        os.replace(partial, path)
        with self.lock:
            self.deliveries += 1
            self.redeliveries += int(existed)
        return "250 Message accepted for delivery"


class SmtpSink(_BackgroundServer):
    """An SMTP server on 127.0.0.1 that files every message into a mailbox folder.

    Example:
        >>> with SmtpSink("var/mailbox") as sink:  # doctest: +SKIP
        ...     smtplib.SMTP(sink.host, sink.port).send_message(message)

    Args:
        mailbox: Folder the ``.eml`` files go to; created if missing.
        port: Port to listen on; 0 lets the OS choose (read it back from ``port``).
    """

    name = "smtp-sink"

    def __init__(self, mailbox: str | os.PathLike[str], port: int = 0) -> None:
        super().__init__(port)
        self.mailbox = Path(mailbox)
        self._handler = _MailboxHandler(self.mailbox)
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    @property
    def deliveries(self) -> int:
        """Messages accepted so far, redeliveries included."""
        with self._handler.lock:
            return self._handler.deliveries

    @property
    def redeliveries(self) -> int:
        """Accepted messages whose Message-ID had been delivered before."""
        with self._handler.lock:
            return self._handler.redeliveries

    def messages(self) -> list[Path]:
        """The ``.eml`` files in the mailbox, one per distinct Message-ID, sorted by name."""
        return sorted(self.mailbox.glob("*.eml"))

    async def _open(self, port: int) -> int:
        self.mailbox.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()

        def new_session() -> SMTP:
            session = SMTP(
                self._handler,
                hostname="localhost",
                ident="autoexec local SMTP sink",
                enable_SMTPUTF8=True,
                loop=loop,
            )
            # Closed sessions are dropped here, so a long-running sink does not accumulate them.
            self._sessions = {s for s in self._sessions if s.transport is not None}
            self._sessions.add(session)
            return session

        self._server = await loop.create_server(new_session, host=LOOPBACK, port=port)
        return int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Clients that keep a connection open would otherwise outlive the server.
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await self._server.wait_closed()


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


class CrmReceiver(_BackgroundServer):
    """An HTTP server on 127.0.0.1 that turns signed webhooks into CRM tasks.

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
        super().__init__(port)
        _secret_bytes(secret)  # a malformed secret fails here, not on the first request
        self._secret = secret
        self.db_path = Path(db_path)
        self.tolerance_seconds = tolerance_seconds
        self.latency_seconds = latency_seconds
        self._db: sqlite3.Connection | None = None
        self._runner: web.AppRunner | None = None
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

    async def _open(self, port: int) -> int:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path, isolation_level=None)
        # WAL lets a person query the table while tasks arrive.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_CRM_SCHEMA)
        self._db = db
        app = web.Application()
        app.router.add_post("/tasks", self._create_task)
        app.router.add_get("/tasks", self._count_tasks)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, port)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _create_task(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            webhook_id = verify_webhook(
                self._secret, request.headers, body, tolerance_seconds=self.tolerance_seconds
            )
        except WebhookVerificationError as error:
            self._count("rejected")
            return web.json_response({"error": str(error)}, status=401)
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
    parser.add_argument(
        "--exit-with-parent",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop when the process that started this one exits (default: on)",
    )
    parser.add_argument(
        "--owner-pid",
        type=int,
        default=None,
        help="also stop when this process exits; an owner that may exit right after starting "
        "this one should pass its pid, since by the time this process looks, its parent may "
        "already be gone",
    )
    return parser.parse_args(argv)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie still answers signal 0 until its parent reaps it; /proc tells (Linux).
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


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
    parent = os.getppid()
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        smtp = SmtpSink(args.mailbox, port=args.smtp_port)
        crm = CrmReceiver(
            secret, args.crm_db, port=args.crm_port, latency_seconds=args.crm_latency_ms / 1000
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        with smtp, crm:
            ready = {
                "smtp_port": smtp.port,
                "crm_port": crm.port,
                "crm_url": crm.url,
                "mailbox": str(args.mailbox.resolve()),
                "crm_db": str(args.crm_db.resolve()),
                "pid": os.getpid(),
            }
            print(json.dumps(ready), flush=True)
            # Woken every half second to notice the parent's exit (the process is re-parented).
            while not stop.wait(0.5):
                if not (smtp.running and crm.running):
                    log.error("a receiver stopped unexpectedly")
                    return 1
                if args.exit_with_parent and os.getppid() != parent:
                    log.info("parent process exited; stopping")
                    break
                if args.owner_pid is not None and not _alive(args.owner_pid):
                    log.info("owner process %d exited; stopping", args.owner_pid)
                    break
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
