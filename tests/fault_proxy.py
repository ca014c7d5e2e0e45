"""A loopback HTTP/1.1 fault proxy for tests: sits between a client and a real receiver.

The proxy binds 127.0.0.1 on a port the OS assigns, runs its own event loop in a daemon thread,
and stops when its ``with`` block ends, like the receivers in ``tests/receivers.py``. It parses
each request (headers and a ``Content-Length`` body) so faults apply per request, even on a
keep-alive connection that carries many of them, and so it can tell which idempotency key each
attempt carried.

Faults (decided by a seeded :class:`FaultPlan`, in arrival order):

- ``reset``: forward the request, wait for the receiver's full answer (so it has recorded the
  delivery), then reset the client's connection (RST): delivered but unacknowledged.
- ``hang``: forward the request (unless ``hang_forwards`` is off), then send nothing back until
  the client gives up and closes the connection.
- ``trickle``: forward the request, then relay the answer a few bytes at a time with a delay
  between the pieces.
- ``burst``: answer 502 or 503 without forwarding, for ``burst_length`` consecutive requests.

Every injected fault is counted (:attr:`FaultProxy.injected`) and every request is recorded
(:attr:`FaultProxy.records`), so a test can prove how many faults it really injected.

Example:
    with WebhookReceiver(dedupe=True) as receiver, FaultProxy(
        receiver.port, FaultPlan(weights={"reset": 0.2}, seed=1, budget=50)
    ) as proxy:
        ... send to proxy.url ...
        assert proxy.injected["reset"] > 0
"""

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

PASS = "pass"
RESET = "reset"
HANG = "hang"
TRICKLE = "trickle"
BURST = "burst"
FAULTS: tuple[str, ...] = (RESET, HANG, TRICKLE, BURST)
# Faults after which the receiver may have recorded a delivery that the client never saw
# acknowledged: each can cause one resend of the same key.
UNACKNOWLEDGING: frozenset[str] = frozenset({RESET, HANG})

_START_TIMEOUT = 10.0
_HEADER_LIMIT = 64 * 1024
_BURST_STATUSES = (502, 503)


@dataclass(frozen=True)
class FaultPlan:
    """Which requests get which fault, reproducibly.

    Attributes:
        weights: Probability, per decision, of starting each fault (``reset``, ``hang``,
            ``trickle``, ``burst``); the rest pass through.
        seed: Seed of the decision sequence (decisions are drawn in arrival order).
        budget: Most faults injected in all (each faulty request counts one); None = no limit.
            A budget guarantees the destination heals, so every action can end.
        scope: ``request`` draws a fault for every request; ``connection`` draws once per
            connection and applies it to every request on that connection.
        burst_length: Consecutive requests answered 5xx once a burst starts.
        trickle_bytes: Size of each piece of a trickled answer.
        trickle_delay_seconds: Pause between two pieces of a trickled answer.
        hang_forwards: Whether a hung request still reaches the receiver.
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    budget: int | None = None
    scope: Literal["request", "connection"] = "request"
    burst_length: int = 3
    trickle_bytes: int = 8
    trickle_delay_seconds: float = 0.005
    hang_forwards: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {list(FAULTS)}")
        if sum(self.weights.values()) > 1.0:
            raise ValueError("fault weights add up to more than 1")


@dataclass
class RequestRecord:
    """One request the proxy received and what it did with it.

    Attributes:
        index: Arrival order over all connections, from 0.
        connection: The client connection it came on, from 0.
        fault: The fault applied (``pass`` for none).
        idempotency_key: Its ``Idempotency-Key`` header ("" when absent).
        webhook_id: Its ``webhook-id`` header ("" when absent).
        entity_id: The ``entity_id`` of its JSON body ("" when absent).
        forwarded: Whether it reached the receiver.
        upstream_status: The receiver's status (0 when not forwarded or no answer came).
        acknowledged: Whether the client got the whole answer.
    """

    index: int
    connection: int
    fault: str
    idempotency_key: str
    webhook_id: str
    entity_id: str
    forwarded: bool = False
    upstream_status: int = 0
    acknowledged: bool = False


class _Decider:
    """Draws faults from a plan, honouring the budget and running bursts to their length."""

    def __init__(self, plan: FaultPlan):
        self._plan = plan
        self._random = random.Random(plan.seed)
        self._spent = 0
        self._burst_left = 0
        self._choices = [(name, w) for name, w in plan.weights.items() if w > 0]

    def _draw(self) -> str:
        roll = self._random.random()
        edge = 0.0
        for name, weight in self._choices:
            edge += weight
            if roll < edge:
                return name
        return PASS

    def next(self) -> str:
        """The fault of the next request (or connection); called under the proxy's lock."""
        if self._plan.budget is not None and self._spent >= self._plan.budget:
            return PASS
        if self._burst_left > 0:
            self._burst_left -= 1
            self._spent += 1
            return BURST
        fault = self._draw()
        if fault == BURST:
            self._burst_left = self._plan.burst_length - 1
        if fault != PASS:
            self._spent += 1
        return fault


class _Message:
    """A parsed HTTP/1.1 message head and its body."""

    def __init__(self, head: bytes, body: bytes):
        self.head = head
        self.body = body
        lines = head.decode("latin-1").split("\r\n")
        self.start_line = lines[0]
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    @property
    def status(self) -> int:
        parts = self.start_line.split(" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    @property
    def wants_close(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


async def _read_message(reader: asyncio.StreamReader) -> _Message | None:
    """Read one message; None at a clean end of stream between messages."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("stream ended inside a message head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise ConnectionError("message head too long") from exc
    message = _Message(head, b"")
    if "chunked" in message.headers.get("transfer-encoding", "").lower():
        # The webhook channel sends bytes with a Content-Length; the proxy need not do more.
        raise ConnectionError("chunked bodies are not supported by the fault proxy")
    length = int(message.headers.get("content-length", "0") or "0")
    if length:
        message.body = await reader.readexactly(length)
    return message


def _burst_response(status: int) -> bytes:
    reason = {502: "Bad Gateway", 503: "Service Unavailable"}[status]
    body = f"fault proxy: {status}".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _entity_of(body: bytes) -> str:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data = json.loads(body)
        if isinstance(data, dict):
            return str(data.get("entity_id", ""))
    return ""


def _reset(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER with a zero timeout turns close() into an RST: the client sees ECONNRESET.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1 that injects faults into HTTP/1.1 exchanges.

    Args:
        upstream_port: Port of the real receiver on 127.0.0.1.
        plan: Which faults to inject; the default injects none.
        path: Path of :attr:`url` (the receiver's path, e.g. ``/hook``).
    """

    def __init__(self, upstream_port: int, plan: FaultPlan | None = None, *, path: str = "/hook"):
        self.upstream_port = upstream_port
        self.plan = plan or FaultPlan()
        self._decider = _Decider(self.plan)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._records: list[RequestRecord] = []
        self._injected: Counter[str] = Counter()
        self._connections = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.WriteTransport] = set()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="FaultProxy", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT):
            raise RuntimeError("FaultProxy did not start")
        if self._error is not None:
            raise RuntimeError("FaultProxy failed to start") from self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, drop every connection and wait for the thread."""
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
        server = await asyncio.start_server(self._accept, sock=self._sock, limit=_HEADER_LIMIT)
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            # Dropping the connections ends their handlers (EOF or reset); a handler still
            # busy after that is cancelled.
            for transport in list(self._transports):
                transport.abort()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=_START_TIMEOUT)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    # -- one client connection -------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        with self._lock:
            connection = self._connections
            self._connections += 1
            fixed = self._decider.next() if self.plan.scope == "connection" else None
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._transports.add(writer.transport)
        try:
            while True:
                request = await _read_message(reader)
                if request is None:
                    return
                with self._changed:
                    fault = fixed if fixed is not None else self._decider.next()
                    record = RequestRecord(
                        index=len(self._records),
                        connection=connection,
                        fault=fault,
                        idempotency_key=request.headers.get("idempotency-key", ""),
                        webhook_id=request.headers.get("webhook-id", ""),
                        entity_id=_entity_of(request.body),
                    )
                    self._records.append(record)
                    self._changed.notify_all()
                if fault == BURST:
                    self._count(BURST)
                    writer.write(_burst_response(_BURST_STATUSES[record.index % 2]))
                    await writer.drain()
                    self._acknowledged(record)
                    continue
                if fault == HANG and not self.plan.hang_forwards:
                    self._count(HANG)
                    await self._hold(reader)
                    return
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                    self._transports.add(upstream[1].transport)
                response = await self._forward(upstream, request, record)
                if response is None:
                    return
                if fault == RESET:
                    self._count(RESET)
                    _reset(writer)
                    return
                if fault == HANG:
                    self._count(HANG)
                    await self._hold(reader)
                    return
                if fault == TRICKLE:
                    self._count(TRICKLE)
                    await self._trickle(writer, response.raw)
                else:
                    writer.write(response.raw)
                    await writer.drain()
                self._acknowledged(record)
                if request.wants_close or response.wants_close:
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            return  # the client went away mid-exchange; its request is recorded as it got
        except asyncio.CancelledError:
            # Only the proxy's own shutdown cancels a handler; ending normally keeps asyncio's
            # server callback from logging the cancellation as an error.
            return
        finally:
            self._transports.discard(writer.transport)
            if upstream is not None:
                self._transports.discard(upstream[1].transport)
                upstream[1].close()
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _forward(
        self,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        request: _Message,
        record: RequestRecord,
    ) -> _Message | None:
        up_reader, up_writer = upstream
        up_writer.write(request.raw)
        await up_writer.drain()
        with self._changed:
            record.forwarded = True
            self._changed.notify_all()
        response = await _read_message(up_reader)
        if response is not None:
            with self._changed:
                record.upstream_status = response.status
                self._changed.notify_all()
        return response

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        # Nothing goes back: wait until the client gives up (EOF or reset) or the proxy stops.
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(4096):
                pass

    async def _trickle(self, writer: asyncio.StreamWriter, raw: bytes) -> None:
        step = max(1, self.plan.trickle_bytes)
        for start in range(0, len(raw), step):
            if start:
                await asyncio.sleep(self.plan.trickle_delay_seconds)  # the fault itself
            writer.write(raw[start : start + step])
            await writer.drain()

    def _count(self, fault: str) -> None:
        with self._changed:
            self._injected[fault] += 1
            self._changed.notify_all()

    def _acknowledged(self, record: RequestRecord) -> None:
        with self._changed:
            record.acknowledged = True
            self._changed.notify_all()

    # -- thread-safe accessors -------------------------------------------------------------

    @property
    def injected(self) -> Counter[str]:
        """Faults actually injected, per fault (a copy)."""
        with self._lock:
            return Counter(self._injected)

    @property
    def faults(self) -> int:
        """Faults actually injected in all."""
        with self._lock:
            return sum(self._injected.values())

    @property
    def records(self) -> list[RequestRecord]:
        """Every request received, in arrival order (copies)."""
        with self._lock:
            return [RequestRecord(**vars(r)) for r in self._records]

    @property
    def connections(self) -> int:
        """Client connections accepted."""
        with self._lock:
            return self._connections

    def unacknowledged_deliveries(self) -> int:
        """Requests the receiver accepted (2xx) whose answer the client never got whole."""
        with self._lock:
            return sum(
                1
                for r in self._records
                if r.forwarded and 200 <= r.upstream_status < 300 and not r.acknowledged
            )

    def attempts_by_entity(self) -> dict[str, list[RequestRecord]]:
        """The requests of each entity (from the body's ``entity_id``), in arrival order."""
        grouped: dict[str, list[RequestRecord]] = {}
        for record in self.records:
            grouped.setdefault(record.entity_id, []).append(record)
        return grouped

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` requests arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._records) >= count, timeout)
