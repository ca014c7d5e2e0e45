"""Real destinations for tests: an HTTP webhook receiver and an SMTP sink.

Both bind 127.0.0.1 on a port the OS assigns, run their own event loop in a daemon thread (so
they never outlive the test process), and stop when their ``with`` block ends: they are
background servers of :mod:`resources.local_servers`, and :class:`SmtpSink` is the demo's own
sink from there, re-exported here. Accessors copy state under a lock;
``wait_for_*`` methods block on a condition, never on a sleep.

Example:
    with WebhookReceiver(secret="whsec_...", rate_limit_every=10) as receiver:
        ... send to receiver.url ...
        assert receiver.unique_keys == expected_keys
"""

import asyncio
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from autoexec_dagster.channels.webhook import verify_signature
from resources.local_servers import DEFAULT_TIMEOUT, AiohttpServer, ReceivedMail, SmtpSink

__all__ = ["ReceivedMail", "SmtpSink", "WebhookReceiver"]


class WebhookReceiver(AiohttpServer):
    """An aiohttp server that records signed webhook deliveries, with fault injection.

    It is not the demo's CRM receiver (``resources.local_receivers.CrmReceiver``): that one
    persists tasks in SQLite for a person to query and answers like a CRM; this one keeps every
    request in memory for assertions and injects the faults the tests need.

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

    name = "webhook-receiver"

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
        super().__init__()
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
        self._arrivals: list[float] = []  # time.monotonic() of each request's arrival
        self._in_flight = 0
        self._max_in_flight = 0

    @property
    def url(self) -> str:
        """The URL to POST to."""
        return f"http://{self.host}:{self.port}/hook"

    def _handler(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        return app

    # -- the handler -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        with self._lock:
            self._arrivals.append(time.monotonic())
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return await self._answer(request)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
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

    @property
    def arrivals(self) -> list[float]:
        """When each request arrived (``time.monotonic()``, in arrival order; a copy)."""
        with self._lock:
            return list(self._arrivals)

    @property
    def max_in_flight(self) -> int:
        """The most requests this receiver was handling at once."""
        with self._lock:
            return self._max_in_flight

    def wait_for_requests(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Block until at least ``count`` requests arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._requests >= count, timeout)
