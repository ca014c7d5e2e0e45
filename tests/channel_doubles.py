"""A test double of a channel: records deliveries in memory and fails on demand.

Used where the executor's own logic (retries, breaker, pause) is under test; the real channels are
tested against real SMTP and HTTP servers in tests/test_channels_*.py and the delivery tests.
"""

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import PrivateAttr

from autoexec_dagster.channels.base import ActionRequest, Channel, as_delivered
from autoexec_dagster.errors import ChannelError


class RecordingChannel(Channel):
    """Delivers to an in-memory Counter; a behaviour may raise to simulate a destination."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _delivered: Counter = PrivateAttr(default_factory=Counter)
    _attempts: Counter = PrivateAttr(default_factory=Counter)
    _behaviour: Callable[[ActionRequest], None] | None = PrivateAttr(default=None)
    _requests: list[ActionRequest] = PrivateAttr(default_factory=list)

    @property
    def delivered(self) -> Counter:
        return self._delivered

    @property
    def attempts(self) -> Counter:
        return self._attempts

    @property
    def requests(self) -> list[ActionRequest]:
        return self._requests

    def behave(self, fn: Callable[[ActionRequest], None] | None) -> "RecordingChannel":
        self._behaviour = fn
        return self

    @contextlib.asynccontextmanager
    async def _sender(self) -> AsyncIterator["RecordingChannel"]:
        yield self

    def open_sender(self) -> Any:
        return self._sender()

    async def send(self, request: ActionRequest) -> str:
        await asyncio.sleep(0)
        with self._lock:
            self._attempts[request.idempotency_key] += 1
        if self._behaviour is not None:
            self._behaviour(request)
        with self._lock:
            self._delivered[request.idempotency_key] += 1
            self._requests.append(request)
        return "recorded"


def fail_first(n: int, error: Callable[[], ChannelError]) -> Callable[[ActionRequest], None]:
    """Fail the first ``n`` attempts of every action with ``error()``."""

    def behaviour(request: ActionRequest) -> None:
        if request.attempt <= n:
            raise error()

    return behaviour


def send_all(ch: Channel, requests: list[ActionRequest]) -> list[str | ChannelError]:
    """Send every request through one sender of ``ch`` concurrently; receipts or errors."""

    async def run() -> list[str | ChannelError]:
        async with ch.open_sender() as sender:

            async def one(request: ActionRequest) -> str | ChannelError:
                try:
                    return as_delivered(await sender.send(request)).receipt
                except ChannelError as exc:
                    return exc

            return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(run())
