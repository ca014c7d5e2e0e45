"""Sharded execution: one partition's delivery shared by N workers through the ledger.

::

    record ──> deliver shard 0 ──┐
           ├─> deliver shard 1 ──┼─> merge
           └─> deliver shard N-1 ┘

1. :func:`prepare_partition` runs once: it checks, guards, records and recovers exactly as
   :func:`~autoexec_dagster.execute_plan` does (steps 1-4), and returns the keys to send.
2. :func:`deliver_shard` runs N times at once, in whatever process, container or machine the
   executor gives each step. Shard ``k`` delivers the keys whose stable hash falls in ``k``
   (:func:`shard_of`), with ``1/N`` of each channel's concurrency and rate limit, claiming each
   through the ledger as any worker does (``FOR UPDATE SKIP LOCKED`` on PostgreSQL). Then it
   sweeps: keys of any shard that a dead worker left ``sending`` (its lease ran out, or on this
   machine its process is gone) are recovered and delivered. Then it advances the partition's
   workflows, claiming instances alongside its siblings.
3. :func:`merge_shards` runs once: it adds the shards' reports to the recording report,
   delivers whatever is still claimable (a shard that stopped early left it), recounts what is
   still pending from the ledger, and delivers the actions people approved.

A shard killed midway is recovered either by a sibling's sweep or by the shard's own step run
again (an executor that redelivers the step, such as celery with late acknowledgement): both
recover only what the dead worker held, and delivery stays once per key at a deduplicating
destination, with at most the dead shard's in-flight window sent twice otherwise.
"""

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from autoexec_dagster.channels.base import Channel
from autoexec_dagster.executor.delivery import DeliveryEngine
from autoexec_dagster.executor.escalation_actions import deliver_approved_escalations_async
from autoexec_dagster.executor.outside_loop import run_outside_loop
from autoexec_dagster.executor.plan_execution import prepare_plan
from autoexec_dagster.executor.recovery import recover_in_doubt
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.experiments.variant_channel import with_variants
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import IN_DOUBT, RESERVED, SENDING
from autoexec_dagster.playbook import Playbook, experiments_by_action, proposes_actions
from autoexec_dagster.workflows.advance import advance_workflows_async
from autoexec_dagster.workflows.report import WorkflowReport

__all__ = [
    "MAX_SHARDS",
    "PreparedPartition",
    "deliver_shard",
    "merge_shards",
    "prepare_partition",
    "shard_of",
]

logger = logging.getLogger("autoexec_dagster")
# Static steps, never one per entity: more shards than this is a deployment to rethink.
MAX_SHARDS = 64
_AT_MOST_ONCE_REASON = "in doubt after a crash; at-most-once action not resent, please reconcile"
_UNFINISHED = (RESERVED, SENDING, IN_DOUBT)


def shard_of(key: str, shards: int) -> int:
    """The shard (``0 .. shards-1``) that delivers idempotency key ``key``.

    A stable hash (BLAKE2b, not Python's per-process ``hash``), so every process agrees.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def check_shards(shards: int) -> int:
    """``shards`` if it is a usable number of shards.

    Raises:
        ValueError: Not an integer between 1 and :data:`MAX_SHARDS`.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be an integer from 1 to {MAX_SHARDS}, got {shards!r}")
    return shards


@dataclass
class PreparedPartition:
    """A recorded partition, waiting for its shards to deliver it.

    Attributes:
        report: What recording counted (routing outcomes, skips, budgets, workflow starts).
        to_send: Idempotency keys to deliver, per action.
        shards: How many shards deliver them.
        started_at: When recording began (epoch seconds), for the partition's wall time.
    """

    report: ExecutionReport
    to_send: dict[str, list[str]]
    shards: int
    started_at: float = field(default_factory=time.time)

    def keys_of(self, shard: int) -> dict[str, list[str]]:
        """The keys shard ``shard`` delivers, per action."""
        return {
            action: [k for k in keys if shard_of(k, self.shards) == shard]
            for action, keys in self.to_send.items()
        }

    @property
    def halted(self) -> bool:
        """A guardrail or the kill switch stopped the batch before anything was sent."""
        return bool(self.report.blocked_reason or self.report.paused_reason)


def prepare_partition(
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    shards: int,
    partition_key: str | None = None,
    insight_name: str | None = None,
    run_id: str | None = None,
    dry_run: bool | None = None,
    log: logging.Logger | Any | None = None,
) -> PreparedPartition:
    """Check, guard, record and recover a routed plan once, for ``shards`` shards to deliver.

    Args:
        plan: The output of :func:`autoexec_dagster.route`.
        playbook: The playbook that routed the plan.
        ledger: The action ledger (shared by every shard: PostgreSQL across machines).
        channels: Channel per action name.
        shards: How many shards deliver the partition.
        partition_key: The insight partition; defaults to the one given to ``route``.
        insight_name: The insight asset key; defaults to the one given to ``route``.
        run_id: Recorded with each action.
        dry_run: Record without sending; None follows the playbook.
        log: A ``logging.Logger`` or Dagster's ``context.log``.

    Returns:
        The :class:`PreparedPartition`.

    Raises:
        PlanError, ChannelConfigError, LedgerError: As :func:`~autoexec_dagster.execute_plan`,
            before anything is recorded or sent.
    """
    started = time.time()
    check_shards(shards)
    report, to_send = prepare_plan(
        plan,
        playbook=playbook,
        ledger=ledger,
        channels=with_variants(channels, experiments_by_action(playbook)),
        partition_key=partition_key,
        insight_name=insight_name,
        run_id=run_id,
        dry_run=dry_run,
        log=log or logger,
    )
    return PreparedPartition(report=report, to_send=to_send, shards=shards, started_at=started)


def _empty_report(prepared: PreparedPartition, run_id: str | None) -> ExecutionReport:
    base = prepared.report
    return ExecutionReport(
        playbook=base.playbook,
        playbook_version=base.playbook_version,
        insight=base.insight,
        partition_key=base.partition_key,
        run_id=run_id,
        dry_run=base.dry_run,
    )


async def _deliver(
    keys: dict[str, list[str]],
    *,
    report: ExecutionReport,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    run_id: str | None,
    lease_seconds: float,
    shares: int,
    log: Any,
    only_recovered: bool = False,
) -> None:
    """Recover what a dead worker holds of ``keys``, then claim and deliver what is claimable
    (with ``only_recovered``, only what was recovered)."""
    recovered = await asyncio.to_thread(
        recover_in_doubt,
        ledger,
        keys,
        report,
        reason=_AT_MOST_ONCE_REASON,
        what="action(s)",
        log=log,
    )
    if only_recovered:
        again = set(recovered)
        keys = {
            action: [k for k in action_keys if k in again] for action, action_keys in keys.items()
        }
    if not any(keys.values()):
        return
    engine = DeliveryEngine(
        ledger=ledger,
        channels=channels,
        report=report,
        playbook=report.playbook,
        partition_key=report.partition_key,
        run_id=run_id,
        lease_seconds=lease_seconds,
        progress_interval=5.0,
        on_progress=None,
        log=log,
        shares=shares,
    )
    await engine.run(keys)


def deliver_shard(
    prepared: PreparedPartition,
    *,
    shard: int,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    run_id: str | None = None,
    lease_seconds: float = 60.0,
    log: logging.Logger | Any | None = None,
    approval_links: Any = None,
) -> ExecutionReport:
    """Deliver one shard of a prepared partition, sweep dead workers' claims, advance workflows.

    Must be called outside a running event loop. Running it again (a redelivered step) sends
    nothing already delivered: it recovers what the dead run held and delivers the rest.

    Args:
        prepared: The output of :func:`prepare_partition`.
        shard: Which shard, ``0 .. prepared.shards - 1``.
        playbook: The playbook.
        ledger: The shared action ledger.
        channels: Channel per action name (the full limits; this shard takes its share).
        run_id: Recorded with each claim.
        lease_seconds: How long a claim holds without a heartbeat.
        log: A ``logging.Logger`` or Dagster's ``context.log``.
        approval_links: Signed-link settings for workflow approval notifications.

    Returns:
        The shard's report: delivery counts only (and its workflow advance); see
        :func:`merge_shards`.

    Raises:
        ValueError: ``shard`` is out of range.
        LedgerError: The ledger failed; what this shard held is recoverable after its lease.
    """
    if not 0 <= shard < prepared.shards:
        raise ValueError(f"shard must be from 0 to {prepared.shards - 1}, got {shard}")
    return run_outside_loop(
        _deliver_shard_async(
            prepared,
            shard=shard,
            playbook=playbook,
            ledger=ledger,
            channels=with_variants(channels, experiments_by_action(playbook)),
            run_id=run_id,
            lease_seconds=lease_seconds,
            log=log or logger,
            approval_links=approval_links,
        ),
        name=f"deliver_shard_{shard}",
    )


async def _deliver_shard_async(
    prepared: PreparedPartition,
    *,
    shard: int,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    run_id: str | None,
    lease_seconds: float,
    log: Any,
    approval_links: Any,
) -> ExecutionReport:
    started = time.perf_counter()
    report = _empty_report(prepared, run_id)
    shares = prepared.shards
    common: dict[str, Any] = {
        "report": report,
        "ledger": ledger,
        "channels": channels,
        "run_id": run_id,
        "lease_seconds": lease_seconds,
        "shares": shares,
        "log": log,
    }
    if prepared.to_send and not prepared.halted and not report.dry_run:
        own = prepared.keys_of(shard)
        total = sum(len(keys) for keys in own.values())
        log.info(
            f"{report.playbook} [{report.partition_key or '-'}]: shard {shard + 1} of {shares} "
            f"delivers {total:,} action(s) with 1/{shares} of each channel's limits"
        )
        await _deliver(own, **common)
        if not report.paused_reason:
            # The sweep: what a sibling that died left in `sending`, recovered and sent here.
            others = {
                action: [k for k in keys if shard_of(k, shares) != shard]
                for action, keys in prepared.to_send.items()
            }
            unfinished = await asyncio.to_thread(_held_by_dead_workers, ledger, others)
            if unfinished:
                await _deliver(unfinished, **common, only_recovered=True)
    if (
        playbook.workflows
        and not report.dry_run
        and not prepared.halted
        and not report.paused_reason
    ):
        report.workflows = await advance_workflows_async(
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=report.partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            log=log,
            approval_links=approval_links,
            report=WorkflowReport(playbook=playbook.name, partition_key=report.partition_key),
            shares=shares,
        )
    report.duration_seconds = time.perf_counter() - started
    log.info(
        f"{report.playbook} [{report.partition_key or '-'}]: shard {shard + 1} of {shares}: "
        f"{report.succeeded:,} succeeded, {report.failed:,} failed, {report.escalated:,} "
        f"escalated, {report.in_doubt_recovered:,} recovered in {report.duration_seconds:.2f} s"
    )
    return report


def _held_by_dead_workers(
    ledger: ActionLedger, keys_by_action: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """The keys still ``sending`` whose holder's lease ran out or whose process is gone.

    A sibling's ``reserved`` keys and live claims are its own: the sweep never races a live shard
    for them, nor locks a row one holds.
    """
    return {
        action: stale
        for action, keys in keys_by_action.items()
        if (stale := ledger.stale_claims(list(keys)))
    }


def merge_shards(
    prepared: PreparedPartition,
    reports: Sequence[ExecutionReport],
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    run_id: str | None = None,
    lease_seconds: float = 60.0,
    log: logging.Logger | Any | None = None,
) -> ExecutionReport:
    """The partition's report from its shards' reports; delivers what no shard finished.

    Must be called outside a running event loop.

    Args:
        prepared: The output of :func:`prepare_partition`.
        reports: Every shard's report.
        playbook: The playbook.
        ledger: The shared action ledger.
        channels: Channel per action name.
        run_id: Recorded with each claim.
        lease_seconds: How long a claim holds without a heartbeat.
        log: A ``logging.Logger`` or Dagster's ``context.log``.

    Returns:
        One :class:`ExecutionReport` for the partition, as an unsharded execution reports it.
    """
    return run_outside_loop(
        _merge_async(
            prepared,
            reports,
            playbook=playbook,
            ledger=ledger,
            channels=with_variants(channels, experiments_by_action(playbook)),
            run_id=run_id,
            lease_seconds=lease_seconds,
            log=log or logger,
        ),
        name="merge_shards",
    )


async def _merge_async(
    prepared: PreparedPartition,
    reports: Sequence[ExecutionReport],
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    run_id: str | None,
    lease_seconds: float,
    log: Any,
) -> ExecutionReport:
    report = prepared.report
    if playbook.workflows and any(r.workflows is not None for r in reports):
        report.workflows = WorkflowReport(
            playbook=playbook.name,
            partition_key=report.partition_key,
            started=report.workflows_started,
        )
    for shard_report in reports:
        report.add_delivery(shard_report)
    keys = [k for action_keys in prepared.to_send.values() for k in action_keys]
    if keys and not prepared.halted and not report.dry_run and not report.paused_reason:
        states = await asyncio.to_thread(ledger.states, keys)
        left = {
            action: [k for k in action_keys if states.get(k, ("", None))[0] in _UNFINISHED]
            for action, action_keys in prepared.to_send.items()
        }
        # Claims between siblings counted as pending in a shard are recounted from the ledger.
        report.pending = 0
        if any(left.values()):
            # Only this step runs now: the channels' full limits apply.
            sweep = _empty_report(prepared, run_id)
            await _deliver(
                left,
                report=sweep,
                ledger=ledger,
                channels=channels,
                run_id=run_id,
                lease_seconds=lease_seconds,
                shares=1,
                log=log,
            )
            report.add_delivery(sweep)
    if proposes_actions(playbook) and not report.dry_run and not report.paused_reason:
        report.approved_actions = await deliver_approved_escalations_async(
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=report.partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            log=log,
        )
    report.duration_seconds = time.time() - prepared.started_at
    log.info(
        f"{playbook.name} [{report.partition_key}] in {prepared.shards} shards: "
        f"{report.succeeded:,} succeeded, {report.failed:,} failed, {report.escalated:,} "
        f"escalated, {report.held_out:,} held out, {report.skipped:,} skipped, "
        f"{report.already_done:,} already done in {report.duration_seconds:.2f} s"
    )
    return report
