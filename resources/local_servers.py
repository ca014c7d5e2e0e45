"""Local servers shared by the demo, the tests and the benchmarks.

- :class:`BackgroundServer` runs an asyncio server on its own daemon thread, on 127.0.0.1, from a
  socket bound before the thread starts (so the port is known and a port in use fails in the
  caller). ``start()`` returns once the server listens and ``stop()`` once its thread has ended,
  each waiting on a future or a thread with a deadline; a daemon thread never outlives its process.
  :class:`AiohttpServer` is the same for an aiohttp application or low-level server.
- :class:`SmtpSink` is the one SMTP destination: it keeps each accepted message in memory (what
  tests assert on) and, given a mailbox folder, also files it as an ``.eml`` a person can open
  (what the demo shows). Tests can require AUTH, refuse recipients and defer messages.

This module imports neither Dagster nor the library: ``python -m resources.local_receivers`` and
the benchmark's latency server use it in processes of their own.
"""

import argparse
import asyncio
import atexit
import contextlib
import email
import email.message
import email.parser
import email.policy
import hashlib
import logging
import os
import random
import re
import socket
import sqlite3
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0

log = logging.getLogger(__name__)


def bound_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1 (port 0: the OS picks), not yet listening.

    Raises:
        OSError: The port could not be bound (for example, in use).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A restarted demo can take its fixed port back from TIME_WAIT; on Linux this still
        # refuses a port another socket listens on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
    except OSError:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """An asyncio server on its own daemon thread, listening on 127.0.0.1.

    Subclasses implement ``_open(sock)`` (serve on the bound socket) and ``_close()`` (release
    whatever ``_open`` got to; called after a failed ``_open`` too). Use ``start()``/``stop()`` or a
    ``with`` block; a stopped server can be started again.

    Args:
        port: Port to listen on; 0 lets the OS choose (read it back from ``port``).
        loop_factory: Makes the thread's event loop (for example ``uvloop.new_event_loop``);
            asyncio's default when None.
    """

    name = "server"

    def __init__(
        self, port: int = 0, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    ) -> None:
        self._requested_port = port
        self._loop_factory = loop_factory
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def host(self) -> str:
        """The address listened on: always the loopback address."""
        return LOOPBACK

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when constructed with port 0).

        Raises:
            RuntimeError: The server has never been started.
        """
        if self._port is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the server thread is alive and listening."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> Self:
        """Start listening on a daemon thread; return once the server accepts connections.

        Args:
            timeout: Seconds to wait for the server to come up.

        Returns:
            The server itself, to chain ``SmtpSink(...).start()``.

        Raises:
            RuntimeError: Already started, or the server did not come up in time.
            OSError: The port could not be bound (for example, in use).
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already started")
        sock = bound_socket(self._requested_port)
        self._port = int(sock.getsockname()[1])
        started: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(sock, started), name=f"autoexec-{self.name}", daemon=True
        )
        self._thread.start()
        try:
            started.result(timeout)
        except TimeoutError as error:
            self.stop(timeout)
            raise RuntimeError(f"{self.name} did not start within {timeout} s") from error
        except BaseException:
            # _open failed: the thread is already on its way out.
            self._thread.join(timeout)
            self._thread = None
            raise
        # A daemon thread is frozen at interpreter exit; stopping first lets files and databases
        # close cleanly when the owner forgets to.
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop listening and wait for the thread to end. Safe to call more than once.

        Raises:
            RuntimeError: The thread did not end within ``timeout`` seconds.
        """
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        atexit.unregister(self.stop)
        if loop is not None and stopping is not None:
            # A closed loop means the thread has already left; the join below confirms it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop within {timeout} s")
        self._thread = None
        self._loop = None
        self._stopping = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, sock: socket.socket, started: "Future[None]") -> None:
        try:
            with asyncio.Runner(loop_factory=self._loop_factory) as runner:
                runner.run(self._serve(sock, started))
        except BaseException as error:
            if started.done():
                log.exception("%s failed", self.name)
            else:
                # Handed to the thread waiting in start(), which re-raises it.
                started.set_exception(error)
        finally:
            # The server closes the socket it took; this covers an _open that never took it.
            sock.close()

    async def _serve(self, sock: socket.socket, started: "Future[None]") -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self._open(sock)
        except BaseException:
            await self._close()
            raise
        log.info("%s listening on %s:%d", self.name, LOOPBACK, self._port)
        started.set_result(None)
        try:
            await self._stopping.wait()
        finally:
            await self._close()
            log.info("%s stopped", self.name)

    async def _open(self, sock: socket.socket) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


class AiohttpServer(BackgroundServer):
    """A :class:`BackgroundServer` for aiohttp: subclasses return their handler from ``_handler``.

    An ``web.Application`` gets the router and middlewares; a low-level ``web.Server`` skips both
    (the benchmark's latency server, which must stay out of the way of what it measures).
    """

    backlog = 128
    # Requests still running at stop() get this long; aiohttp's 60 s default would hold up a
    # test's teardown behind a slow handler.
    shutdown_timeout = 2.0

    def __init__(
        self, port: int = 0, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    ) -> None:
        super().__init__(port, loop_factory=loop_factory)
        self._runner: web.BaseRunner | None = None

    def _handler(self) -> web.Application | web.Server:
        raise NotImplementedError

    async def _open(self, sock: socket.socket) -> None:
        handler = self._handler()
        if isinstance(handler, web.Application):
            self._runner = web.AppRunner(
                handler, access_log=None, shutdown_timeout=self.shutdown_timeout
            )
        else:
            self._runner = web.ServerRunner(handler, shutdown_timeout=self.shutdown_timeout)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=self.backlog).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class SqliteAiohttpServer(AiohttpServer):
    """An :class:`AiohttpServer` that keeps its state in a SQLite file a person can open.

    Subclasses set ``schema`` (SQL run on open) and read and write ``self._db`` from their
    handlers; the file opens with the server and closes after it.
    """

    schema = ""

    def __init__(self, db_path: str | os.PathLike[str], port: int = 0) -> None:
        super().__init__(port)
        self.db_path = Path(db_path)
        self._db: sqlite3.Connection | None = None

    async def _open(self, sock: socket.socket) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path, isolation_level=None)
        # WAL lets a person (or a test) query the tables while requests arrive.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(self.schema)
        self._db = db
        await super()._open(sock)

    async def _close(self) -> None:
        await super()._close()
        if self._db is not None:
            self._db.close()
            self._db = None


# -- the SMTP sink -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    """One message the SMTP sink accepted."""

    message: email.message.Message
    mail_from: str
    recipients: tuple[str, ...]
    peer: tuple[str, int]


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


class SmtpSink(BackgroundServer):
    """An aiosmtpd server on 127.0.0.1 that accepts mail for the tests and the demo.

    Every accepted message is kept in memory (``messages``) and, with a ``mailbox``, written as
    ``<Message-ID>.eml`` into that folder: a redelivered message replaces its first copy, so the
    folder holds one file per distinct message, as the receiving side of the idempotency promise.

    Example:
        >>> with SmtpSink("var/mailbox") as sink:  # doctest: +SKIP
        ...     smtplib.SMTP(sink.host, sink.port).send_message(message)

    Args:
        mailbox: Folder the ``.eml`` files go to (created if missing); None files nothing.
        port: Port to listen on; 0 lets the OS choose.
        fail_rate: Share of messages answered ``451`` (seeded, reproducible).
        reject_recipients: Recipients answered ``550 5.1.1`` at RCPT TO.
        auth: User name -> password; when given, AUTH is offered (without TLS) and required.
        keep_messages: Keep accepted messages in memory; a long-running sink that only files
            them turns this off.
        seed: Seed of the ``fail_rate`` random generator.
    """

    name = "smtp-sink"

    def __init__(
        self,
        mailbox: str | os.PathLike[str] | None = None,
        port: int = 0,
        *,
        fail_rate: float = 0.0,
        reject_recipients: set[str] | None = None,
        auth: Mapping[str, str] | None = None,
        keep_messages: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(port)
        self.mailbox = None if mailbox is None else Path(mailbox)
        self.fail_rate = fail_rate
        self.reject_recipients = {r.lower() for r in reject_recipients or ()}
        self.keep_messages = keep_messages
        self._auth = dict(auth) if auth is not None else None
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._messages: list[ReceivedMail] = []
        self._seen: set[str] = set()
        self._deliveries = 0
        self._redeliveries = 0
        self._deferred = 0
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    # -- serving ---------------------------------------------------------------------------

    async def _open(self, sock: socket.socket) -> None:
        if self.mailbox is not None:
            self.mailbox.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        auth: dict[str, Any] = {}
        if self._auth is not None:
            auth = {
                "authenticator": self._authenticate,
                "auth_required": True,
                "auth_require_tls": False,
            }

        def new_session() -> SMTP:
            session = SMTP(
                self,
                hostname="localhost",
                ident="autoexec local SMTP sink",
                enable_SMTPUTF8=True,
                loop=loop,
                **auth,
            )
            # Closed sessions are dropped here, so a long-running sink does not accumulate them.
            self._sessions = {s for s in self._sessions if s.transport is not None}
            self._sessions.add(session)
            return session

        self._server = await loop.create_server(new_session, sock=sock)

    async def _close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Clients that keep a connection open (a pooled channel) would otherwise hold the
        # server's wait_closed() and outlive it.
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await self._server.wait_closed()
        self._server = None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self._auth is not None
            and self._auth.get(data.login.decode()) == data.password.decode()
        )
        return AuthResult(success=ok, handled=False)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list
    ) -> str:
        if address.lower() in self.reject_recipients:
            return "550 5.1.1 <address> no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._changed:
            if self.fail_rate and self._random.random() < self.fail_rate:
                self._deferred += 1
                self._changed.notify_all()
                return "451 4.3.0 try again later"
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        name = mailbox_filename(headers.get("Message-ID"), raw)
        existed = False
        if self.mailbox is not None:
            path = self.mailbox / name
            existed = path.exists()
            # Written aside and renamed: a person opening the folder never sees half a message,
            # and a redelivery replaces the file in one step.
            partial = path.with_name(f".{path.name}.{threading.get_ident()}.partial")
            partial.write_bytes(raw)
            os.replace(partial, path)
        received = None
        if self.keep_messages:
            received = ReceivedMail(
                message=email.message_from_bytes(raw, policy=email.policy.default),
                mail_from=str(envelope.mail_from),
                recipients=tuple(envelope.rcpt_tos),
                peer=tuple(session.peer),  # type: ignore[arg-type]
            )
        with self._changed:
            self._deliveries += 1
            self._redeliveries += int(existed or name in self._seen)
            self._seen.add(name)
            if received is not None:
                self._messages.append(received)
            self._changed.notify_all()
        return "250 2.0.0 OK queued"

    # -- thread-safe accessors -------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMail]:
        """Accepted messages, in arrival order (a copy; empty unless ``keep_messages``)."""
        with self._lock:
            return list(self._messages)

    @property
    def deliveries(self) -> int:
        """Messages accepted so far, redeliveries included."""
        with self._lock:
            return self._deliveries

    @property
    def redeliveries(self) -> int:
        """Accepted messages whose Message-ID had been accepted (or filed) before."""
        with self._lock:
            return self._redeliveries

    @property
    def deferred(self) -> int:
        """Messages answered 451."""
        with self._lock:
            return self._deferred

    @property
    def connections(self) -> int:
        """Distinct client connections that delivered at least one kept message."""
        with self._lock:
            return len({m.peer for m in self._messages})

    def mailbox_files(self) -> list[Path]:
        """The ``.eml`` files in the mailbox, one per distinct Message-ID, sorted by name."""
        if self.mailbox is None:
            return []
        return sorted(self.mailbox.glob("*.eml"))

    def wait_for_messages(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Block until at least ``count`` messages were accepted; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._deliveries >= count, timeout)


# -- running a server as its own process -------------------------------------------------------


def add_lifetime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--exit-with-parent`` and ``--owner-pid``, the options :func:`serve_in_foreground`
    takes from every local server's command line.

    Args:
        parser: The server's argument parser.
    """
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


def process_alive(pid: int) -> bool:
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


def serve_in_foreground(
    servers: "list[BackgroundServer]",
    *,
    ready: Callable[[], Mapping[str, Any]],
    what: str,
    exit_with_parent: bool,
    owner_pid: int | None,
) -> int:
    """Run started-on-enter servers until SIGTERM, SIGINT, the parent's or the owner's exit.

    Prints ``ready()`` as one JSON line once every server listens (what a parent process waits
    for), then wakes every half second to notice a server that stopped by itself or an owner
    that is gone (a re-parented process has lost its parent).

    Returns:
        The exit status: 0 after a clean stop, 1 when a server stopped by itself, 2 when a server
        could not start.
    """
    import json
    import signal
    import sys

    parent = os.getppid()
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        with contextlib.ExitStack() as stack:
            for server in servers:
                stack.enter_context(server)
            print(json.dumps(dict(ready())), flush=True)
            while not stop.wait(0.5):
                if not all(server.running for server in servers):
                    log.error("the %s stopped unexpectedly", what)
                    return 1
                if exit_with_parent and os.getppid() != parent:
                    log.info("parent process exited; stopping")
                    break
                if owner_pid is not None and not process_alive(owner_pid):
                    log.info("owner process %d exited; stopping", owner_pid)
                    break
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
