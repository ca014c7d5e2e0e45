"""``execute_plan``: execute a routed plan through its channels, with the ledger as the outbox.

Order of work, so that bad input causes no side effect and nothing is lost:

1. Re-key and check the plan; every action has a channel; every channel accepts its rows.
2. The kill switch and the guardrails (blast radius, max actions): a blocked batch is escalated
   as a whole and nothing is sent.
3. Every entity is recorded (escalations, holdouts, skips final; actions ``reserved``), in chunks.
4. Actions left in doubt by a crashed worker are recovered.
5. Per channel, a producer claims actions in small chunks under a lease while workers deliver
   them concurrently (rate limit, retries with backoff and jitter, circuit breaker); outcomes are
   committed in batches. Claimed-but-uncommitted actions never exceed the in-flight window, which
   bounds duplicates after a crash.
"""

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import numpy as np
import pandas as pd

from autoexec_dagster.channels.base import ActionRequest, Channel, Sender
from autoexec_dagster.errors import ChannelError, PlanError
from autoexec_dagster.executor.backoff import backoff_delay
from autoexec_dagster.executor.circuit_breaker import CircuitBreaker
from autoexec_dagster.executor.rate_limit import TokenBucket
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger, Outcome, new_worker_id
from autoexec_dagster.ledger.schema import (
    DRY_RUN,
    ESCALATED,
    FAILED,
    FINAL_STATES,
    HELD_OUT,
    RESERVED,
    SKIPPED,
    SUCCEEDED,
)
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.routing import PLAN_ATTRS, PLAN_COLUMNS, idempotency_keys, rekey

logger = logging.getLogger("autoexec_dagster")

_RECORD_CHUNK = 5_000
_DRY_PREFIX = "dry:"
_STATE_FOR_DECISION = {"escalate": ESCALATED, "holdout": HELD_OUT, "skip": SKIPPED}


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


def execute_plan(
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    insight: str | None = None,
    run_id: str | None = None,
    dry_run: bool | None = None,
    lease_seconds: float = 60.0,
    progress_interval_seconds: float = 5.0,
    on_progress: Callable[[Progress], None] | None = None,
    log: logging.Logger | Any | None = None,
) -> ExecutionReport:
    """Execute every ``act`` row of a plan through its channel and record everything in the ledger.

    Calling it again with the same plan sends nothing: finished entities count as
    ``already_done``. Must be called outside a running event loop (use
    :func:`execute_plan_async` inside one).

    Args:
        plan: The output of :func:`autoexec_dagster.route`.
        playbook: The playbook that routed the plan.
        ledger: The action ledger.
        channels: Channel per action name.
        partition_key: The insight partition; defaults to the one given to ``route``.
        insight: The insight asset key; defaults to the one given to ``route``.
        run_id: Recorded with each action (the Dagster run id, for lineage).
        dry_run: Record what would be sent and send nothing; defaults to the playbook's guardrail.
        lease_seconds: How long a claim holds without a heartbeat before another worker may
            treat it as abandoned.
        progress_interval_seconds: How often progress is logged on long batches.
        on_progress: Called with a :class:`Progress` at the same interval.
        log: Logger (a ``logging.Logger`` or Dagster's ``context.log``).

    Returns:
        The :class:`ExecutionReport`.

    Raises:
        PlanError: An action has no channel, or the plan does not belong to this playbook.
        ChannelConfigError: A channel refuses a row (invalid address, host not allowed, ...).
        LedgerError: The ledger cannot be written.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "execute_plan() was called inside an event loop; await execute_plan_async()"
        )
    return asyncio.run(
        execute_plan_async(
            plan,
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=partition_key,
            insight=insight,
            run_id=run_id,
            dry_run=dry_run,
            lease_seconds=lease_seconds,
            progress_interval_seconds=progress_interval_seconds,
            on_progress=on_progress,
            log=log,
        )
    )


async def execute_plan_async(
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    insight: str | None = None,
    run_id: str | None = None,
    dry_run: bool | None = None,
    lease_seconds: float = 60.0,
    progress_interval_seconds: float = 5.0,
    on_progress: Callable[[Progress], None] | None = None,
    log: logging.Logger | Any | None = None,
) -> ExecutionReport:
    """Async form of :func:`execute_plan`, with the same arguments and behaviour."""
    started = time.perf_counter()
    attrs = plan.attrs.get(PLAN_ATTRS, {}) if isinstance(plan, pd.DataFrame) else {}
    if not isinstance(plan, pd.DataFrame):
        raise PlanError(f"the plan must be a DataFrame from route(), got {type(plan).__name__}")
    partition = partition_key if partition_key is not None else (attrs.get("partition_key") or "")
    keyed = rekey(plan, playbook=playbook, partition_key=partition, insight_name=insight)
    info = keyed.attrs[PLAN_ATTRS]
    dry = playbook.guardrails.dry_run if dry_run is None else dry_run
    out = log or logger
    report = ExecutionReport(
        playbook=playbook.name,
        playbook_version=info["playbook_version"],
        insight=info["insight"],
        partition_key=partition,
        run_id=run_id,
        dry_run=dry,
        total=len(keyed),
    )
    decision = keyed["decision"].astype(str).to_numpy()
    act_positions = np.flatnonzero(decision == "act")
    report.flagged = int((decision != "skip").sum())

    _check_channels(keyed, act_positions, channels)

    paused = ledger.pause_reason(playbook.name)
    if paused:
        report.paused_reason = paused
        report.pending = len(act_positions)
        out.warning(f"{playbook.name} [{partition}]: not executed, {paused}")
        report.duration_seconds = time.perf_counter() - started
        return report

    blocked = _guardrail_violation(
        playbook, total=len(keyed), flagged=report.flagged, actions=len(act_positions)
    )
    if blocked:
        report.blocked_reason = blocked
        if dry:
            report.escalated = report.flagged
        elif escalate_batch(keyed, ledger=ledger, reason=blocked):
            report.escalated = report.flagged
            report.note_escalation(blocked, report.flagged)
        else:
            report.already_done = report.flagged
        out.warning(f"{playbook.name} [{partition}]: batch blocked, {blocked}")
        report.duration_seconds = time.perf_counter() - started
        return report

    cooldown: dict[tuple[str, str], datetime] = {}
    cooldown_days = playbook.guardrails.cooldown_days
    if cooldown_days and len(act_positions):
        acting = keyed.iloc[act_positions]
        cooldown = ledger.recent_deliveries(
            playbook=playbook.name,
            entity_ids=acting["entity_id"].astype(str).tolist(),
            since=datetime.now(UTC) - timedelta(days=cooldown_days),
            exclude_partition=partition,
        )
    to_send = _record(
        ledger, keyed, report, channels=channels, run_id=run_id, dry=dry, cooldown=cooldown
    )
    if not dry and to_send:
        keys = keyed["idempotency_key"].to_numpy()
        pending_keys = [keys[p] for p in to_send]
        recovered = ledger.recover(pending_keys)
        if recovered:
            report.in_doubt_recovered = len(recovered)
            at_most_once = [k for k, mode in recovered.items() if mode == "at_most_once"]
            if at_most_once:
                reason = "in doubt after a crash; at-most-once action not resent, please reconcile"
                context = _contexts(keyed, [_position(keyed, k) for k in at_most_once], info)
                escalated = ledger.escalate_actions(
                    at_most_once, kind="in_doubt", reason=reason, context=context
                )
                report.escalated += len(escalated)
                report.note_escalation(reason, len(escalated))
                gone = set(escalated)
                to_send = [p for p in to_send if keys[p] not in gone]
            out.warning(
                f"{playbook.name} [{partition}]: {len(recovered)} action(s) were in doubt after a "
                f"crash; {len(recovered) - len(at_most_once)} are resent with the same key"
            )
        run = _Run(
            keyed=keyed,
            info=info,
            ledger=ledger,
            channels=channels,
            report=report,
            run_id=run_id,
            lease_seconds=lease_seconds,
            progress_interval=progress_interval_seconds,
            on_progress=on_progress,
            log=out,
            started=started,
        )
        # Long-lived objects (Dagster's definitions, imported modules) would otherwise be rescanned
        # by every collection the send loop's garbage triggers: ~0.4 s per 10,000 actions here.
        gc.freeze()
        try:
            await run.execute(to_send)
        finally:
            gc.unfreeze()

    report.duration_seconds = time.perf_counter() - started
    out.info(
        f"{playbook.name} [{partition}]: {report.succeeded:,} succeeded, {report.failed:,} failed, "
        f"{report.escalated:,} escalated, {report.held_out:,} held out, {report.skipped:,} skipped, "
        f"{report.already_done:,} already done in {report.duration_seconds:.2f} s"
    )
    return report


def _check_channels(
    keyed: pd.DataFrame, act_positions: np.ndarray, channels: Mapping[str, Channel]
) -> None:
    if len(act_positions) == 0:
        return
    acting = keyed.iloc[act_positions]
    needed = sorted(acting["action"].astype(str).unique())
    missing = [a for a in needed if a not in channels]
    if missing:
        rules = {
            a: sorted(acting.loc[acting["action"].astype(str) == a, "rule"].astype(str).unique())
            for a in missing
        }
        detail = "; ".join(f"{a!r} (rule {', '.join(rules[a])})" for a in missing)
        raise PlanError(
            f"no channel for action(s) {detail}; channels given: {sorted(channels) or 'none'}"
        )
    for action in needed:
        channel = channels[action]
        if not isinstance(channel, Channel):
            raise PlanError(
                f"channels[{action!r}] must be an autoexec_dagster Channel, got {type(channel).__name__}"
            )
        channel.validate_rows(acting[acting["action"].astype(str) == action])


def _guardrail_violation(
    playbook: Playbook, *, total: int, flagged: int, actions: int
) -> str | None:
    limits = playbook.guardrails
    if total and flagged / total > limits.max_flagged_fraction:
        return (
            f"{flagged:,} of {total:,} entities flagged ({flagged / total:.1%}), above the "
            f"playbook's max_flagged_fraction of {limits.max_flagged_fraction:.1%}; a model or data "
            "fault is likelier than a real mass event, so nothing was executed"
        )
    if limits.max_actions is not None and actions > limits.max_actions:
        return (
            f"{actions:,} actions exceed the playbook's max_actions of {limits.max_actions:,}; "
            "nothing was executed"
        )
    return None


def escalate_batch(plan: pd.DataFrame, *, ledger: ActionLedger, reason: str) -> bool:
    """Record a blocked batch as one escalation, keyed by partition so it escalates once.

    Nothing is sent and no action is reserved, so a corrected insight for the same partition
    can still be executed; the escalation tells a person why this batch was not.

    Args:
        plan: The plan, keyed for its partition (see :func:`autoexec_dagster.route`).
        ledger: The action ledger.
        reason: Why the batch was blocked.

    Returns:
        True when the escalation was opened now, False when it already existed.
    """
    info = plan.attrs[PLAN_ATTRS]
    key = idempotency_keys(
        insight=info["insight"],
        partition_key=info["partition_key"] or "",
        playbook_version=info["playbook_version"],
        actions=["guardrail:batch"],
        entity_ids=["*"],
    )[0]
    decisions = plan["decision"].astype(str)
    flagged = plan[decisions != "skip"]
    inserted = ledger.open_escalations(
        [
            {
                "idempotency_key": key,
                "playbook": info["playbook"],
                "playbook_version": info["playbook_version"],
                "insight": info["insight"],
                "partition_key": info["partition_key"] or "",
                "entity_id": "*",
                "rule": "(guardrail)",
                "kind": "guardrail",
                "reason": reason,
                "data": {
                    "total": len(plan),
                    "flagged": len(flagged),
                    "by_decision": {str(k): int(v) for k, v in decisions.value_counts().items()},
                    "sample_entity_ids": flagged["entity_id"].astype(str).tolist()[:100],
                },
            }
        ]
    )
    return bool(inserted)


def _position(keyed: pd.DataFrame, key: str) -> int:
    return int(np.flatnonzero(keyed["idempotency_key"].to_numpy() == key)[0])


def _contexts(
    keyed: pd.DataFrame, positions: Sequence[int], info: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Escalation context (entity data, rule, playbook) per key, for the given plan rows."""
    if not len(positions):
        return {}
    rows = keyed.iloc[list(positions)]
    records = rows.to_dict("records")
    return {
        str(record["idempotency_key"]): {
            "playbook": info["playbook"],
            "playbook_version": info["playbook_version"],
            "insight": info["insight"],
            "partition_key": info["partition_key"],
            "entity_id": str(record["entity_id"]),
            "rule": str(record["rule"]),
            "data": {k: v for k, v in record.items() if k not in PLAN_COLUMNS or k == "entity_id"},
        }
        for record in records
    }


def _record(
    ledger: ActionLedger,
    keyed: pd.DataFrame,
    report: ExecutionReport,
    *,
    channels: Mapping[str, Channel],
    run_id: str | None,
    dry: bool,
    cooldown: Mapping[tuple[str, str], datetime],
) -> list[int]:
    """Record every entity in the ledger; return plan positions of actions still to send.

    Works in chunks so a million-row plan never holds a million row dicts at once. Actions in
    ``cooldown`` (the entity got the same action recently) are recorded as skipped, with why.
    """
    info = keyed.attrs[PLAN_ATTRS]
    base = {
        "playbook": info["playbook"],
        "playbook_version": info["playbook_version"],
        "insight": info["insight"],
        "partition_key": info["partition_key"],
        "run_id": run_id,
    }
    delivery = {name: ch.delivery for name, ch in channels.items()}
    to_send: list[int] = []
    keys_all = keyed["idempotency_key"].to_numpy()
    entity_all = keyed["entity_id"].to_numpy()
    decision_all = keyed["decision"].astype(str).to_numpy()
    rule_all = keyed["rule"].astype(str).to_numpy()
    action_all = keyed["action"].astype(object).to_numpy()
    for start in range(0, len(keyed), _RECORD_CHUNK):
        stop = min(start + _RECORD_CHUNK, len(keyed))
        rows: list[dict[str, Any]] = []
        for i in range(start, stop):
            decision = decision_all[i]
            action = action_all[i]
            action = (
                None
                if action is None or (isinstance(action, float) and math.isnan(action))
                else str(action)
            )
            detail = None
            last = cooldown.get((entity_all[i], action)) if decision == "act" and action else None
            if last is not None:
                detail = f"cooldown: {action} delivered {last:%Y-%m-%d %H:%M} UTC"
            if dry:
                key, state = _DRY_PREFIX + keys_all[i], DRY_RUN
            else:
                key = keys_all[i]
                if last is not None:
                    state = SKIPPED
                else:
                    state = RESERVED if decision == "act" else _STATE_FOR_DECISION[decision]
            rows.append(
                {
                    **base,
                    "idempotency_key": key,
                    "entity_id": entity_all[i],
                    "rule": rule_all[i],
                    "action": action,
                    "decision": decision,
                    "state": state,
                    "delivery": delivery.get(action or "", "at_least_once"),
                    "detail": detail,
                }
            )
        inserted = set(ledger.reserve(rows))
        existing = [r["idempotency_key"] for r in rows if r["idempotency_key"] not in inserted]
        states = ledger.states(existing) if existing else {}
        new_escalations: list[int] = []
        for offset, row in enumerate(rows):
            position = start + offset
            decision = row["decision"]
            action = row["action"] or ""
            if row["idempotency_key"] in inserted:
                if decision == "act" and row["detail"] is not None:
                    report.cooled_down += 1
                    report.count(action, "cooldown")
                elif decision == "act":
                    if dry:
                        report.dry_run_actions += 1
                        report.count(action, "dry_run")
                    else:
                        to_send.append(position)
                elif decision == "escalate":
                    report.escalated += 1
                    if not dry:
                        new_escalations.append(position)
                elif decision == "holdout":
                    report.held_out += 1
                    report.count(action, "held_out")
                else:
                    report.skipped += 1
                continue
            state, _worker = states.get(row["idempotency_key"], (None, None))
            if decision == "act" and not dry and state not in FINAL_STATES:
                to_send.append(position)  # reserved or in doubt after an earlier crash
            else:
                report.already_done += 1
                if decision == "act":
                    report.count(action, "already_done")
        if new_escalations:
            contexts = _contexts(keyed, new_escalations, info)
            reasons = keyed["reason"].astype(str).to_numpy()
            ledger.open_escalations(
                [
                    {
                        **{k: v for k, v in contexts[keys_all[p]].items()},
                        "idempotency_key": keys_all[p],
                        "kind": "rule",
                        "reason": reasons[p],
                    }
                    for p in new_escalations
                ]
            )
            for p in new_escalations:
                report.note_escalation(reasons[p])
    return to_send


class _ChannelRun:
    """Per-channel state of one execution: breaker, bucket, in-flight accounting."""

    def __init__(self, name: str, channel: Channel, positions: list[int]):
        self.name = name
        self.channel = channel
        self.positions = positions
        self.breaker = CircuitBreaker(channel.circuit_breaker_threshold)
        self.bucket = TokenBucket(channel.rate_limit_per_second)
        self.window = max(2 * channel.max_concurrency, 16)
        self.outstanding = 0  # claimed and not yet committed
        self.capacity = asyncio.Condition()
        self.unclaimed: list[str] = []


class _Run:
    """One execution of the ``act`` rows of a plan."""

    def __init__(
        self,
        *,
        keyed: pd.DataFrame,
        info: Mapping[str, Any],
        ledger: ActionLedger,
        channels: Mapping[str, Channel],
        report: ExecutionReport,
        run_id: str | None,
        lease_seconds: float,
        progress_interval: float,
        on_progress: Callable[[Progress], None] | None,
        log: Any,
        started: float,
    ):
        self.keyed = keyed
        self.info = info
        self.ledger = ledger
        self.channels = channels
        self.report = report
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self.progress_interval = progress_interval
        self.on_progress = on_progress
        self.log = log
        self.started = started
        self.worker = new_worker_id()
        self.keys = keyed["idempotency_key"].to_numpy()
        self.position_of: dict[str, int] = {}
        self.buffer: list[tuple[_ChannelRun, Outcome]] = []
        self.flush_wanted = asyncio.Event()
        self.paused: str | None = None
        self.done = 0
        self.total = 0
        self.released: list[str] = []
        self.stopping = False

    async def execute(self, positions: list[int]) -> None:
        actions = self.keyed["action"].astype(str).to_numpy()
        groups: dict[str, list[int]] = {}
        for p in positions:
            groups.setdefault(actions[p], []).append(p)
            self.position_of[self.keys[p]] = p
        self.total = len(positions)
        runs = [_ChannelRun(name, self.channels[name], ps) for name, ps in groups.items()]
        # Capacity frees only when outcomes are committed: flush well before any window fills.
        flush_size = max(1, min(1000, sum(r.window for r in runs) // 4))
        self.flush_size = flush_size
        flusher = asyncio.create_task(self._flusher())
        background = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._watch_kill_switch()),
            asyncio.create_task(self._progress()),
        ]
        try:
            await asyncio.gather(*(self._run_channel(r) for r in runs))
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # Never cancel a flush midway: its ledger write may land while its tally is lost.
            self.stopping = True
            self.flush_wanted.set()
            await flusher
        for run in runs:
            if run.unclaimed and run.breaker.is_open:
                context = _contexts(
                    self.keyed, [self.position_of[k] for k in run.unclaimed], self.info
                )
                escalated = self.ledger.escalate_actions(
                    run.unclaimed, kind="circuit_open", reason=run.breaker.reason, context=context
                )
                self.report.escalated += len(escalated)
                self.report.count(run.name, "escalated", len(escalated))
                self.report.note_escalation(f"{run.name}: circuit open", len(escalated))
            elif run.unclaimed:
                self.report.pending += len(run.unclaimed)
        if self.released:
            self.ledger.release(self.released, worker=self.worker)
            self.report.pending += len(self.released)
        if self.paused:
            self.report.paused_reason = self.paused

    async def _run_channel(self, run: _ChannelRun) -> None:
        queue: asyncio.Queue[ActionRequest | None] = asyncio.Queue()
        chunk = max(1, min(run.window // 2, 500))
        keys = [self.keys[p] for p in run.positions]
        async with run.channel.open_sender() as sender:
            workers = [
                asyncio.create_task(self._deliver_loop(run, sender, queue))
                for _ in range(min(run.channel.max_concurrency, len(keys)))
            ]
            try:
                for index in range(0, len(keys), chunk):
                    batch = keys[index : index + chunk]
                    if not self.paused:
                        # Checked before every claim, so a pause stops the playbook before its
                        # next chunk even between polls of the watcher.
                        self.paused = await asyncio.to_thread(
                            self.ledger.pause_reason, self.info["playbook"]
                        )
                    if self.paused or run.breaker.is_open:
                        run.unclaimed.extend(keys[index:])
                        break
                    async with run.capacity:
                        await run.capacity.wait_for(
                            lambda b=batch: run.outstanding + len(b) <= run.window
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
                    run.outstanding += len(claimed)
                    for request in self._requests(claimed):
                        queue.put_nowait(request)
            finally:
                for _ in workers:
                    queue.put_nowait(None)
                await asyncio.gather(*workers)

    def _requests(self, claimed: Sequence[str]) -> list[ActionRequest]:
        positions = [self.position_of[k] for k in claimed]
        records = cast(list[dict[str, Any]], self.keyed.iloc[positions].to_dict("records"))
        info = self.info
        return [
            ActionRequest(
                idempotency_key=key,
                entity_id=str(record["entity_id"]),
                action=str(record["action"]),
                playbook=info["playbook"],
                playbook_version=info["playbook_version"],
                insight=info["insight"],
                partition_key=info["partition_key"],
                rule=str(record["rule"]),
                data=record,
            )
            for key, record in zip(claimed, records, strict=True)
        ]

    async def _deliver_loop(
        self, run: _ChannelRun, sender: Sender, queue: "asyncio.Queue[ActionRequest | None]"
    ) -> None:
        while True:
            request = await queue.get()
            if request is None:
                return
            outcome = await self._deliver(run, sender, request)
            if outcome is None:
                self.released.append(request.idempotency_key)
                await self._settle(run, 1)
                continue
            self.buffer.append((run, outcome))
            if len(self.buffer) >= self.flush_size:
                self.flush_wanted.set()

    async def _deliver(
        self, run: _ChannelRun, sender: Sender, request: ActionRequest
    ) -> Outcome | None:
        channel = run.channel
        attempts = 0
        while True:
            if self.paused:
                return None
            if run.breaker.is_open:
                return Outcome(
                    key=request.idempotency_key,
                    state=ESCALATED,
                    attempts=attempts,
                    error=run.breaker.reason,
                    escalation_kind="circuit_open",
                )
            await run.bucket.acquire()
            attempts += 1
            attempt = replace(request, attempt=attempts)
            try:
                receipt = await sender.send(attempt)
            except ChannelError as exc:
                error = f"{type(exc).__name__}: {exc}"
                run.breaker.record_failure(error)
                if exc.retryable and attempts < channel.max_attempts and not run.breaker.is_open:
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
                if run.breaker.is_open and exc.retryable:
                    continue  # escalated as circuit_open on the next pass
                return Outcome(
                    key=request.idempotency_key,
                    state=FAILED,
                    attempts=attempts,
                    error=f"after {attempts} attempt(s): {error}",
                    request_digest=channel.request_digest(attempt),
                    escalation_kind="delivery_failed",
                )
            except Exception as exc:  # a bug in a channel must not lose the action
                error = f"unexpected {type(exc).__name__}: {exc}"
                run.breaker.record_failure(error)
                return Outcome(
                    key=request.idempotency_key,
                    state=FAILED,
                    attempts=attempts,
                    error=error,
                    escalation_kind="delivery_failed",
                )
            run.breaker.record_success()
            return Outcome(
                key=request.idempotency_key,
                state=SUCCEEDED,
                attempts=attempts,
                detail=receipt,
                request_digest=channel.request_digest(attempt),
            )

    async def _settle(self, run: _ChannelRun, n: int) -> None:
        async with run.capacity:
            run.outstanding -= n
            run.capacity.notify_all()

    async def _flush(self) -> None:
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        outcomes = [o for _, o in batch]
        escalating = [self.position_of[o.key] for o in outcomes if o.escalation_kind]
        context = _contexts(self.keyed, escalating, self.info) if escalating else None
        await asyncio.to_thread(
            self.ledger.complete, outcomes, worker=self.worker, escalation_context=context
        )
        per_run: dict[int, tuple[_ChannelRun, int]] = {}
        report = self.report
        for run, outcome in batch:
            held = per_run.get(id(run))
            per_run[id(run)] = (run, (held[1] if held else 0) + 1)
            self.done += 1
            if outcome.state == SUCCEEDED:
                report.succeeded += 1
                report.count(run.name, "succeeded")
            elif outcome.state == FAILED:
                report.failed += 1
                report.count(run.name, "failed")
                report.note_error(outcome.error or "failed")
                report.note_escalation(f"{run.name}: delivery failed")
            else:
                report.escalated += 1
                report.count(run.name, "escalated")
                report.note_escalation(f"{run.name}: circuit open")
                if run.name not in report.circuit_opened:
                    report.circuit_opened.append(run.name)
        for run, n in per_run.values():
            await self._settle(run, n)

    async def _flusher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush_wanted.wait(), timeout=0.25)
            self.flush_wanted.clear()
            await self._flush()
            if self.stopping and not self.buffer:
                return

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.lease_seconds / 3))
            await asyncio.to_thread(
                self.ledger.heartbeat, worker=self.worker, lease_seconds=self.lease_seconds
            )

    async def _watch_kill_switch(self) -> None:
        while not self.paused:
            await asyncio.sleep(0.5)
            self.paused = await asyncio.to_thread(self.ledger.pause_reason, self.info["playbook"])
        self.log.warning(f"{self.info['playbook']}: stopping, {self.paused}")

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            elapsed = time.perf_counter() - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            remaining = self.total - self.done
            eta = f"{remaining / rate:.0f} s" if rate > 0 else "unknown"
            r = self.report
            self.log.info(
                f"{self.info['playbook']} [{self.info['partition_key']}]: {self.done:,}/{self.total:,} "
                f"actions done ({r.succeeded:,} succeeded, {r.failed:,} failed, {r.retries:,} retries) "
                f"at {rate:,.0f}/s, about {eta} left"
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
