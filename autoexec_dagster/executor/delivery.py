"""The delivery engine: claim -> send -> complete, for work items the ledger holds.

The engine is given idempotency keys, grouped by action; everything else (entity, request data,
delivery mode) comes from the ledger when it claims them, so any reserved side effect can be
delivered by it: a plan's actions today, a workflow's steps tomorrow.

Per channel, a producer claims keys in small chunks under a lease while workers deliver them
concurrently (rate limit, retries with backoff and jitter, circuit breaker); outcomes are
committed in batches. Claimed-but-uncommitted actions never exceed the in-flight window, which
bounds duplicates after a crash.

Failure: every task is supervised. When one fails (a ledger error in a flush, a heartbeat, a
kill-switch poll, or a progress callback), the others are cancelled, heartbeats stop so the leases
run out and another worker can recover the rows, and the error is raised within seconds.
"""

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from autoexec_dagster.channels.base import ActionRequest, Channel, Sender, as_delivered
from autoexec_dagster.errors import ChannelError, LedgerError
from autoexec_dagster.executor.backoff import backoff_delay
from autoexec_dagster.executor.circuit_breaker import CircuitBreaker
from autoexec_dagster.executor.rate_limit import TokenBucket
from autoexec_dagster.executor.recording import entity_data
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger, Outcome, WorkItem, new_worker_id
from autoexec_dagster.ledger.payload import bounded_output
from autoexec_dagster.ledger.schema import ESCALATED, FAILED, SUCCEEDED

# The young generations are collected by hand while automatic collection is off: a full collection
# rescans every long-lived object of the process (Dagster's definitions, imported modules), which
# cost ~0.4 s per 10,000 actions here, while cycles made by the send loop die young.
_COLLECT_EVERY = 2_000
T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """A progress snapshot, passed to the ``on_progress`` callback.

    Attributes:
        done: Actions finished in this call.
        total: Actions to execute in this call.
        succeeded: Delivered so far.
        failed: Failed so far.
        escalated: Escalated so far (rules and channel failures).
        rate: Actions finished per second so far.
        elapsed_seconds: Time since the call started.
    """

    done: int
    total: int
    succeeded: int
    failed: int
    escalated: int
    rate: float
    elapsed_seconds: float


def locked_call(lock: threading.Lock, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` while holding ``lock`` (run it in a worker thread).

    A lease heartbeat and a batched write by the same worker touch the same rows; on PostgreSQL
    they would lock them in different orders and deadlock, so they never run at once. Cancelling
    the task awaiting ``asyncio.to_thread`` does not stop its thread, so the lock, not the
    cancellation, is what keeps them apart.
    """
    with lock:
        return fn(*args, **kwargs)


async def keep_leases(
    lock: threading.Lock,
    extend: Callable[..., int],
    *,
    worker: str,
    lease_seconds: float,
) -> None:
    """Extend ``worker``'s leases every third of the lease until cancelled (a heartbeat task).

    ``extend`` is the ledger's heartbeat for actions or for workflow instances; it runs under
    ``lock``, which the worker's batched writes hold too (see :func:`locked_call`).
    """
    while True:
        await asyncio.sleep(max(0.5, lease_seconds / 3))
        await asyncio.to_thread(
            locked_call, lock, extend, worker=worker, lease_seconds=lease_seconds
        )


def escalation_context(item: WorkItem) -> dict[str, Any]:
    """The fields of the escalation opened for a work item that ended with a person."""
    return {
        "playbook": item.playbook,
        "playbook_version": item.playbook_version,
        "insight": item.insight,
        "partition_key": item.partition_key,
        "entity_id": item.entity_id,
        "rule": item.rule,
        "data": entity_data(item.data),
    }


def _request(item: WorkItem) -> ActionRequest:
    return ActionRequest(
        idempotency_key=item.key,
        entity_id=item.entity_id,
        action=item.action,
        playbook=item.playbook,
        playbook_version=item.playbook_version,
        insight=item.insight,
        partition_key=item.partition_key,
        rule=item.rule,
        data=item.data,
        variant=item.variant,
    )


def shard_limits(channel: Channel, shares: int) -> tuple[int, float]:
    """A channel's ``(max_concurrency, rate_limit_per_second)`` for one of ``shares`` workers.

    The limits of a channel hold for a whole partition; a partition delivered by ``shares``
    workers at once divides them evenly (concurrency rounded down, at least one request), so
    their sum never exceeds the channel's rate, nor its concurrency when that is at least
    ``shares`` (below, each worker still sends one request at a time). No worker talks to
    another, so nothing is shared at run time and a worker that dies takes only its own share
    with it.
    """
    if shares < 1:
        raise ValueError(f"shares must be at least 1, got {shares}")
    return max(1, channel.max_concurrency // shares), channel.rate_limit_per_second / shares


class _Lane:
    """Per-channel state of one delivery: breaker, bucket, in-flight accounting."""

    def __init__(self, name: str, channel: Channel, keys: Sequence[str], *, shares: int = 1):
        self.name = name
        self.channel = channel
        self.keys = list(keys)
        self.concurrency, rate = shard_limits(channel, shares)
        self.breaker = CircuitBreaker(channel.circuit_breaker_threshold)
        self.bucket = TokenBucket(rate)
        self.window = max(2 * self.concurrency, 16)
        self.outstanding = 0  # claimed and not yet committed
        self.capacity = asyncio.Condition()
        self.queued: set[str] = set()  # claimed, not yet picked up by a sender
        self.senders: list[asyncio.Task[None]] = []


class DeliveryEngine:
    """Deliver reserved actions from the ledger through their channels.

    Args:
        ledger: The action ledger holding the reserved actions.
        channels: Channel per action name.
        report: Counts are added to this report.
        playbook: Playbook name (the kill switch is checked for it).
        partition_key: For log lines.
        run_id: Recorded with each claim.
        lease_seconds: How long a claim holds without a heartbeat.
        progress_interval: Seconds between progress log lines and callbacks.
        on_progress: Called with a :class:`Progress` at that interval.
        log: A ``logging.Logger`` or Dagster's ``context.log``.
        escalate_failures: Open an escalation for each action that fails or meets an open
            circuit. Workflow steps turn this off: their workflow escalates the entity once, with
            the evidence of every step.
        shares: How many workers deliver the partition at once (the shards of a sharded
            execution); each channel's concurrency and rate limit are divided among them
            (:func:`shard_limits`).
    """

    def __init__(
        self,
        *,
        ledger: ActionLedger,
        channels: Mapping[str, Channel],
        report: ExecutionReport,
        playbook: str,
        partition_key: str,
        run_id: str | None,
        lease_seconds: float,
        progress_interval: float,
        on_progress: Callable[[Progress], None] | None,
        log: Any,
        escalate_failures: bool = True,
        shares: int = 1,
    ):
        self.escalate_failures = escalate_failures
        self.shares = shares
        self._rows_lock = threading.Lock()
        self.ledger = ledger
        self.channels = channels
        self.report = report
        self.playbook = playbook
        self.partition_key = partition_key
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self.progress_interval = progress_interval
        self.on_progress = on_progress
        self.log = log
        self.worker = new_worker_id()
        self.started = time.perf_counter()
        self.items: dict[str, WorkItem] = {}
        self.buffer: list[tuple[_Lane, Outcome]] = []
        self.flush_wanted = asyncio.Event()
        self.flush_size = 1
        self.paused: str | None = None
        self.done = 0
        self.total = 0
        self.released: list[str] = []
        self.stopping = False
        self._since_collect = 0

    async def run(self, keys_by_action: Mapping[str, Sequence[str]]) -> None:
        """Deliver every key; return when each is completed, released or left to another worker.

        Raises:
            LedgerError: The ledger failed; the run stopped within seconds and the unfinished rows
                are recoverable once their lease runs out.
        """
        lanes = [
            _Lane(name, self.channels[name], keys, shares=self.shares)
            for name, keys in keys_by_action.items()
            if keys
        ]
        self.total = sum(len(lane.keys) for lane in lanes)
        if not lanes:
            return
        # Capacity frees only when outcomes are committed: flush well before any window fills.
        self.flush_size = max(1, min(1000, sum(lane.window for lane in lanes) // 4))
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            await self._supervise(lanes)
        finally:
            if collecting:
                gc.enable()
        if self.released:
            await asyncio.to_thread(
                locked_call, self._rows_lock, self.ledger.release, self.released, worker=self.worker
            )
            self.report.pending += len(self.released)
        if self.paused:
            self.report.paused_reason = self.paused

    async def _supervise(self, lanes: list[_Lane]) -> None:
        work = asyncio.create_task(self._all_lanes(lanes), name="autoexec-lanes")
        flusher = asyncio.create_task(self._flusher(), name="autoexec-flusher")
        background = [
            asyncio.create_task(
                keep_leases(
                    self._rows_lock,
                    self.ledger.heartbeat,
                    worker=self.worker,
                    lease_seconds=self.lease_seconds,
                ),
                name="autoexec-heartbeat",
            ),
            asyncio.create_task(self._watch_kill_switch(), name="autoexec-kill-switch"),
            asyncio.create_task(self._progress(), name="autoexec-progress"),
        ]
        everything = [work, flusher, *background]
        try:
            pending: set[asyncio.Task[Any]] = set(everything)
            while work in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise _error_of(task)
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # a failure that landed just now is raised, not dropped
            # Never cancel a flush midway: its ledger write may land while its tally is lost.
            self.stopping = True
            self.flush_wanted.set()
            await flusher
        except BaseException:
            # The senders too: a lane would otherwise drain its whole queue before it ends.
            senders = [w for lane in lanes for w in lane.senders]
            for task in [*everything, *senders]:
                task.cancel()
            await asyncio.gather(*everything, *senders, return_exceptions=True)
            await self._release_queued(lanes)
            raise

    async def _release_queued(self, lanes: list[_Lane]) -> None:
        """After a failure: give back what was claimed but never reached a sender, if we can."""
        queued = [key for lane in lanes for key in lane.queued]
        if queued:
            with contextlib.suppress(LedgerError):
                await asyncio.to_thread(
                    locked_call, self._rows_lock, self.ledger.release, queued, worker=self.worker
                )

    async def _all_lanes(self, lanes: list[_Lane]) -> None:
        await asyncio.gather(*(self._run_lane(lane) for lane in lanes))

    async def _run_lane(self, lane: _Lane) -> None:
        queue: asyncio.Queue[ActionRequest | None] = asyncio.Queue()
        chunk = max(1, min(lane.window // 2, 500))
        async with lane.channel.open_sender() as sender:
            workers = [
                asyncio.create_task(self._deliver_loop(lane, sender, queue))
                for _ in range(min(lane.concurrency, len(lane.keys)))
            ]
            lane.senders = workers
            try:
                for index in range(0, len(lane.keys), chunk):
                    batch = lane.keys[index : index + chunk]
                    if not self.paused:
                        # Checked before every claim, so a pause stops the playbook before its
                        # next chunk even between polls of the watcher.
                        self.paused = await asyncio.to_thread(
                            self.ledger.pause_reason, self.playbook
                        )
                    if self.paused:
                        self.report.pending += len(lane.keys) - index
                        break
                    async with lane.capacity:
                        await lane.capacity.wait_for(
                            lambda b=batch: lane.outstanding + len(b) <= lane.window
                        )
                    claimed = await asyncio.to_thread(
                        self.ledger.claim,
                        batch,
                        worker=self.worker,
                        lease_seconds=self.lease_seconds,
                        run_id=self.run_id,
                    )
                    elsewhere = len(batch) - len(claimed)
                    if elsewhere:
                        self.report.claimed_elsewhere += elsewhere
                        self.report.pending += elsewhere
                    lane.outstanding += len(claimed)
                    for item in claimed:
                        self.items[item.key] = item
                        if lane.breaker.is_open:
                            # The destination is down: the rest go to a person, unsent.
                            self._buffer(lane, self._circuit_open(item.key, attempts=0, lane=lane))
                        else:
                            lane.queued.add(item.key)
                            queue.put_nowait(_request(item))
            finally:
                for _ in workers:
                    queue.put_nowait(None)
                await asyncio.gather(*workers)

    def _buffer(self, lane: _Lane, outcome: Outcome) -> None:
        self.buffer.append((lane, outcome))
        if len(self.buffer) >= self.flush_size:
            self.flush_wanted.set()

    def _circuit_open(self, key: str, *, attempts: int, lane: _Lane) -> Outcome:
        if not self.escalate_failures:
            return Outcome(key=key, state=FAILED, attempts=attempts, error=lane.breaker.reason)
        return Outcome(
            key=key,
            state=ESCALATED,
            attempts=attempts,
            error=lane.breaker.reason,
            escalation_kind="circuit_open",
        )

    def _failure_kind(self) -> str | None:
        return "delivery_failed" if self.escalate_failures else None

    async def _deliver_loop(
        self, lane: _Lane, sender: Sender, queue: "asyncio.Queue[ActionRequest | None]"
    ) -> None:
        while True:
            request = await queue.get()
            if request is None:
                return
            lane.queued.discard(request.idempotency_key)
            outcome = await self._deliver(lane, sender, request)
            if outcome is None:
                self.released.append(request.idempotency_key)
                await self._settle(lane, 1)
                continue
            self._buffer(lane, outcome)

    async def _deliver(self, lane: _Lane, sender: Sender, request: ActionRequest) -> Outcome | None:
        channel = lane.channel
        key = request.idempotency_key
        attempts = 0
        while True:
            if self.paused:
                return None
            if lane.breaker.is_open:
                return self._circuit_open(key, attempts=attempts, lane=lane)
            await lane.bucket.acquire()
            attempts += 1
            attempt = replace(request, attempt=attempts)
            try:
                # Everything that can fail is computed before the side effect.
                request_digest = channel.request_digest(attempt)
            except Exception as exc:
                return Outcome(
                    key=key,
                    state=FAILED,
                    attempts=attempts - 1,
                    error=f"not sent: the request could not be prepared: "
                    f"{type(exc).__name__}: {exc}",
                    escalation_kind=self._failure_kind(),
                )
            try:
                result = await sender.send(attempt)
            except ChannelError as exc:
                error = f"{type(exc).__name__}: {exc}"
                lane.breaker.record_failure(error)
                if exc.retryable and attempts < channel.max_attempts and not lane.breaker.is_open:
                    self.report.retries += 1
                    await asyncio.sleep(
                        backoff_delay(
                            attempts,
                            base=channel.backoff_base_seconds,
                            cap=channel.backoff_max_seconds,
                            retry_after=exc.retry_after,
                        )
                    )
                    continue
                if lane.breaker.is_open and exc.retryable:
                    continue  # escalated as circuit_open on the next pass
                return Outcome(
                    key=key,
                    state=FAILED,
                    attempts=attempts,
                    error=f"after {attempts} attempt(s): {error}",
                    request_digest=request_digest,
                    escalation_kind=self._failure_kind(),
                )
            except Exception as exc:  # a bug in a channel must not lose the action
                error = f"unexpected {type(exc).__name__}: {exc}"
                lane.breaker.record_failure(error)
                return Outcome(
                    key=key,
                    state=FAILED,
                    attempts=attempts,
                    error=error,
                    request_digest=request_digest,
                    escalation_kind=self._failure_kind(),
                )
            # Delivered: from here on only the outcome is recorded, nothing may raise.
            lane.breaker.record_success()
            delivered = as_delivered(result)
            try:
                output = bounded_output(delivered.output)
            except Exception as exc:
                output = bounded_output({"_unrecordable": f"{type(exc).__name__}: {exc}"[:200]})
            return Outcome(
                key=key,
                state=SUCCEEDED,
                attempts=attempts,
                detail=delivered.receipt,
                request_digest=request_digest,
                output=output,
            )

    async def _settle(self, lane: _Lane, n: int) -> None:
        async with lane.capacity:
            lane.outstanding -= n
            lane.capacity.notify_all()

    async def _flush(self) -> None:
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        outcomes = [o for _, o in batch]
        context = {
            o.key: escalation_context(self.items[o.key])
            for o in outcomes
            if o.escalation_kind and o.key in self.items
        }
        await asyncio.to_thread(
            locked_call,
            self._rows_lock,
            self.ledger.complete,
            outcomes,
            worker=self.worker,
            escalation_context=context,
        )
        per_lane: dict[int, tuple[_Lane, int]] = {}
        report = self.report
        for lane, outcome in batch:
            self.items.pop(outcome.key, None)
            held = per_lane.get(id(lane))
            per_lane[id(lane)] = (lane, (held[1] if held else 0) + 1)
            self.done += 1
            if outcome.state == SUCCEEDED:
                report.succeeded += 1
                report.count(lane.name, "succeeded")
            elif outcome.state == FAILED:
                report.failed += 1
                report.count(lane.name, "failed")
                report.note_error(outcome.error or "failed")
                report.note_escalation(f"{lane.name}: delivery failed")
            else:
                report.escalated += 1
                report.count(lane.name, "escalated")
                report.note_escalation(f"{lane.name}: circuit open")
                if lane.name not in report.circuit_opened:
                    report.circuit_opened.append(lane.name)
        for lane, n in per_lane.values():
            await self._settle(lane, n)
        self._since_collect += len(batch)
        if self._since_collect >= _COLLECT_EVERY:
            self._since_collect = 0
            gc.collect(1)

    async def _flusher(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives just as the event is set, and a failed run would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self.flush_wanted.wait()
            self.flush_wanted.clear()
            await self._flush()
            if self.stopping and not self.buffer:
                return

    async def _watch_kill_switch(self) -> None:
        while not self.paused:
            await asyncio.sleep(0.5)
            self.paused = await asyncio.to_thread(self.ledger.pause_reason, self.playbook)
        self.log.warning(f"{self.playbook}: stopping, {self.paused}")

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            elapsed = time.perf_counter() - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            remaining = self.total - self.done
            eta = f"{remaining / rate:.0f} s" if rate > 0 else "unknown"
            r = self.report
            self.log.info(
                f"{self.playbook} [{self.partition_key}]: {self.done:,}/{self.total:,} "
                f"actions done ({r.succeeded:,} succeeded, {r.failed:,} failed, {r.retries:,} "
                f"retries) at {rate:,.0f}/s, about {eta} left"
            )
            if self.on_progress is not None:
                self.on_progress(
                    Progress(
                        done=self.done,
                        total=self.total,
                        succeeded=r.succeeded,
                        failed=r.failed,
                        escalated=r.escalated,
                        rate=rate,
                        elapsed_seconds=elapsed,
                    )
                )


def _error_of(task: "asyncio.Task[Any]") -> BaseException:
    exc = task.exception()
    assert exc is not None
    return exc
