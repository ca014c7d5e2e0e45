"""Real destinations for tests: an HTTP webhook receiver and an SMTP sink.

Both bind 127.0.0.1 on a port the OS assigns, run their own event loop in a daemon thread (so
they never outlive the test process), and stop when their ``with`` block ends. Accessors copy
state under a lock; ``wait_for_*`` methods block on a condition, never on a sleep.

Example:
    with WebhookReceiver(secret="whsec_...", rate_limit_every=10) as receiver:
        ... send to receiver.url ...
        assert receiver.unique_keys == expected_keys
"""

import asyncio
import email
import email.message
import email.policy
import json
import random
import socket
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from autoexec_dagster.channels.webhook import verify_signature

_START_TIMEOUT = 10.0


def _bound_socket() -> socket.socket:
    # Binding here and handing the socket to the server avoids the find-a-free-port race.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class WebhookReceiver:
    """An aiohttp server that records signed webhook deliveries, with fault injection.

    Args:
        secret: Verify ``webhook-signature`` with this secret; bad or missing signatures get 401.
        fail_rate: Share of requests answered 500 (seeded, reproducible).
        rate_limit_every: Answer every Nth request 429 with ``Retry-After: retry_after``.
        retry_after: The ``Retry-After`` value sent with 429 (seconds, or an HTTP date string).
        latency_seconds: Simulated destination latency, awaited in the handler before answering.
        dedupe: Acknowledge a repeated idempotency key with 200 without counting a new delivery.
        status: Answer every request with this status (and ``headers``), recording nothing unless
            it is 2xx.
        headers: Extra response headers for ``status``.
        seed: Seed of the ``fail_rate`` random generator.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        fail_rate: float = 0.0,
        rate_limit_every: int = 0,
        retry_after: str | float = 1,
        latency_seconds: float = 0.0,
        dedupe: bool = False,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        seed: int = 0,
    ):
        self.secret = secret
        self.fail_rate = fail_rate
        self.rate_limit_every = rate_limit_every
        self.retry_after = str(retry_after)
        self.latency_seconds = latency_seconds
        self.dedupe = dedupe
        self.status = status
        self.response_headers = dict(headers or {})
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._deliveries: Counter[str] = Counter()
        self._payloads: dict[str, Any] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self._requests = 0
        self._duplicates = 0
        self._rejected = 0
        self._statuses: Counter[int] = Counter()
        self._sock = _bound_socket()
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="WebhookReceiver", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT):
            raise RuntimeError("WebhookReceiver did not start")
        if self._error is not None:
            raise RuntimeError("WebhookReceiver failed to start") from self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server and wait for its thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(_START_TIMEOUT)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, self._sock)
        await site.start()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # -- the handler -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.latency_seconds:
            await asyncio.sleep(self.latency_seconds)
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = headers.get("idempotency-key", "")
        with self._changed:
            self._requests += 1
            number = self._requests
            if self.secret is not None and not verify_signature(self.secret, headers, body):
                self._rejected += 1
                answer: tuple[int, dict[str, str]] = (401, {})
            elif self.status != 200:
                answer = (self.status, self.response_headers)
            elif self.rate_limit_every and number % self.rate_limit_every == 0:
                answer = (429, {"Retry-After": self.retry_after})
            elif self.fail_rate and self._random.random() < self.fail_rate:
                answer = (500, {})
            else:
                answer = (200, {})
            status = answer[0]
            self._statuses[status] += 1
            if 200 <= status < 300:
                if self.dedupe and key in self._deliveries:
                    self._duplicates += 1
                else:
                    self._deliveries[key] += 1
                    self._payloads[key] = json.loads(body)
                    self._headers[key] = headers
            self._changed.notify_all()
        return web.Response(status=status, headers=answer[1], text="ok" if status < 300 else "no")

    # -- thread-safe accessors -------------------------------------------------------------

    @property
    def deliveries(self) -> Counter[str]:
        """Accepted deliveries per idempotency key (a copy)."""
        with self._lock:
            return Counter(self._deliveries)

    @property
    def unique_keys(self) -> set[str]:
        """Idempotency keys delivered at least once."""
        with self._lock:
            return set(self._deliveries)

    @property
    def payloads(self) -> dict[str, Any]:
        """The last accepted JSON body per idempotency key."""
        with self._lock:
            return dict(self._payloads)

    @property
    def request_headers(self) -> dict[str, dict[str, str]]:
        """The lower-cased request headers of the last accepted delivery per key."""
        with self._lock:
            return {key: dict(h) for key, h in self._headers.items()}

    @property
    def requests(self) -> int:
        """Requests received, whatever the answer."""
        with self._lock:
            return self._requests

    @property
    def duplicates(self) -> int:
        """Repeated keys acknowledged in ``dedupe`` mode."""
        with self._lock:
            return self._duplicates

    @property
    def rejected(self) -> int:
        """Requests refused for a bad or missing signature."""
        with self._lock:
            return self._rejected

    @property
    def statuses(self) -> Counter[int]:
        """How often each status was answered."""
        with self._lock:
            return Counter(self._statuses)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` requests arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._requests >= count, timeout)


@dataclass(frozen=True)
class ReceivedMail:
    """One message the SMTP sink accepted."""

    message: email.message.Message
    mail_from: str
    recipients: tuple[str, ...]
    peer: tuple[str, int]


class _SocketController(Controller):
    """aiosmtpd's Controller serving a socket bound in advance (port 0 does not work with it)."""

    def __init__(self, handler: Any, sock: socket.socket, **kwargs: Any):
        super().__init__(handler, hostname="127.0.0.1", port=sock.getsockname()[1], **kwargs)
        self._sock = sock

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


class SmtpSink:
    """An aiosmtpd server on 127.0.0.1 that keeps every message it accepts.

    Args:
        fail_rate: Share of messages answered ``451`` (seeded, reproducible).
        reject_recipients: Recipients answered ``550 5.1.1`` at RCPT TO.
        auth: User name -> password; when given, AUTH is offered (without TLS) and required.
        seed: Seed of the ``fail_rate`` random generator.
    """

    def __init__(
        self,
        *,
        fail_rate: float = 0.0,
        reject_recipients: set[str] | None = None,
        auth: Mapping[str, str] | None = None,
        seed: int = 0,
    ):
        self.fail_rate = fail_rate
        self.reject_recipients = {r.lower() for r in reject_recipients or ()}
        self._auth = dict(auth) if auth is not None else None
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._messages: list[ReceivedMail] = []
        self._deferred = 0
        sock = _bound_socket()
        self.host = "127.0.0.1"
        self.port: int = sock.getsockname()[1]
        kwargs: dict[str, Any] = {}
        if self._auth is not None:
            kwargs = {
                "authenticator": self._authenticate,
                "auth_required": True,
                "auth_require_tls": False,
            }
        self._controller = _SocketController(self, sock, **kwargs)

    def __enter__(self) -> "SmtpSink":
        self._controller.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._controller.stop()

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
            message = email.message_from_bytes(raw, policy=email.policy.default)
            self._messages.append(
                ReceivedMail(
                    message=message,
                    mail_from=str(envelope.mail_from),
                    recipients=tuple(envelope.rcpt_tos),
                    peer=tuple(session.peer),  # type: ignore[arg-type]
                )
            )
            self._changed.notify_all()
        return "250 2.0.0 OK queued"

    @property
    def messages(self) -> list[ReceivedMail]:
        """Accepted messages, in arrival order (a copy)."""
        with self._lock:
            return list(self._messages)

    @property
    def deferred(self) -> int:
        """Messages answered 451."""
        with self._lock:
            return self._deferred

    @property
    def connections(self) -> int:
        """Distinct client connections that delivered at least one message."""
        with self._lock:
            return len({m.peer for m in self._messages})

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` messages were accepted; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._messages) >= count, timeout)
