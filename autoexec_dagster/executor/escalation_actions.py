"""Delivering the actions people approved from the escalation queue.

An approval (:meth:`~autoexec_dagster.ActionLedger.approve_escalations`) reserves the proposed
action in the outbox in the transaction that records the decision. This module delivers those
reserved rows through the same claim -> send -> complete engine as every other action
(:class:`~autoexec_dagster.executor.delivery.DeliveryEngine`): each is claimed under a lease,
sent once with its idempotency key, and completed; a crash leaves it in doubt, and the next call
resends it with the same key (at-least-once) or escalates it for reconciliation (at-most-once).
Calling it again sends nothing that was delivered.

Call it from the partition's run (the execution job) after the plan is executed; a sensor finds
the partitions with approved actions due with
:meth:`~autoexec_dagster.ActionLedger.escalation_actions_due`.
"""

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from autoexec_dagster.channels.base import Channel
from autoexec_dagster.errors import ChannelConfigError, PlanError
from autoexec_dagster.executor.delivery import DeliveryEngine
from autoexec_dagster.executor.outside_loop import run_outside_loop
from autoexec_dagster.executor.recovery import escalation_context_of, recover_in_doubt
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.schema import RESERVED
from autoexec_dagster.playbook import Playbook

__all__ = ["deliver_approved_escalations", "deliver_approved_escalations_async"]

logger = logging.getLogger("autoexec_dagster")
_AT_MOST_ONCE_REASON = (
    "in doubt after a crash; at-most-once approved action not resent, please reconcile"
)


def deliver_approved_escalations(
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    run_id: str | None = None,
    lease_seconds: float = 60.0,
    log: logging.Logger | Any | None = None,
) -> ExecutionReport:
    """Deliver every approved proposed action of a playbook that is not delivered yet.

    Must be called outside a running event loop (await
    :func:`deliver_approved_escalations_async` inside one).

    Args:
        playbook: The playbook whose escalations were approved.
        ledger: The action ledger.
        channels: Channel per action name (every proposed action needs one).
        partition_key: Only this partition's approvals (None: every partition).
        run_id: Recorded with each claim (the Dagster run id, for lineage).
        lease_seconds: How long a claim holds without a heartbeat.
        log: Logger (a ``logging.Logger`` or Dagster's ``context.log``).

    Returns:
        The :class:`ExecutionReport` of this call: ``succeeded``, ``failed``, ``escalated`` (a
        channel refused the entity's data, or an at-most-once action was in doubt), ``pending``
        (paused, or claimed by another live worker).

    Raises:
        PlanError: A proposed action has no channel (nothing is sent).
        ChannelConfigError: A channel is misconfigured (nothing is sent).
        LedgerError: The ledger cannot be read or written.
    """
    return run_outside_loop(
        deliver_approved_escalations_async(
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            log=log,
        ),
        name="deliver_approved_escalations",
    )


async def deliver_approved_escalations_async(
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    run_id: str | None = None,
    lease_seconds: float = 60.0,
    log: logging.Logger | Any | None = None,
) -> ExecutionReport:
    """Async form of :func:`deliver_approved_escalations`, with the same arguments and behaviour."""
    started = time.perf_counter()
    out = log or logger
    report, to_send = await asyncio.to_thread(
        _prepare,
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        partition_key=partition_key,
        run_id=run_id,
        log=out,
    )
    if to_send:
        engine = DeliveryEngine(
            ledger=ledger,
            channels=channels,
            report=report,
            playbook=playbook.name,
            partition_key=report.partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            progress_interval=5.0,
            on_progress=None,
            log=out,
        )
        await engine.run(to_send)
    report.duration_seconds = time.perf_counter() - started
    if to_send:
        out.info(
            f"{playbook.name} [{partition_key or 'all partitions'}]: approved escalations: "
            f"{report.succeeded:,} action(s) delivered, {report.failed:,} failed, "
            f"{report.escalated:,} escalated, {report.pending:,} pending"
        )
    return report


def _prepare(
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None,
    run_id: str | None,
    log: Any,
) -> tuple[ExecutionReport, dict[str, list[str]]]:
    """Find, check and recover the approved actions; returns the report and the keys to send."""
    report = ExecutionReport(
        playbook=playbook.name,
        playbook_version=playbook.effective_version,
        insight="",
        partition_key=partition_key or "",
        run_id=run_id,
    )
    pending = ledger.approved_actions_pending(playbook=playbook.name, partition_key=partition_key)
    if not pending:
        return report, {}
    total = sum(len(keys) for keys in pending.values())
    report.total = report.flagged = total
    missing = sorted(action for action in pending if action not in channels)
    if missing:
        raise PlanError(
            f"no channel for approved proposed action(s) {missing} of playbook "
            f"{playbook.name!r}; channels given: {sorted(channels) or 'none'} (nothing was sent)"
        )
    paused = ledger.pause_reason(playbook.name)
    if paused:
        report.paused_reason = paused
        report.pending = total
        log.warning(f"{playbook.name}: approved actions not delivered, {paused}")
        return report, {}
    to_send: dict[str, list[str]] = {}
    for action, keys in pending.items():
        channel = channels[action]
        if not isinstance(channel, Channel):
            raise PlanError(
                f"channels[{action!r}] must be an autoexec_dagster Channel, got "
                f"{type(channel).__name__}"
            )
        # Nothing was sent for reserved rows yet: they take the channel's delivery mode now, so
        # a crash during their delivery is recovered the way the channel asks.
        ledger.set_delivery_mode(keys, delivery=channel.delivery)
        refused = _refused_rows(ledger, channel, keys)
        if refused:
            escalated = _escalate_refused(ledger, refused)
            report.escalated += len(escalated)
            report.count(action, "escalated", len(escalated))
            for reason in {r for r, _ in refused.values()}:
                report.note_escalation(f"{action}: {reason}")
        to_send[action] = [k for k in keys if k not in refused]
    recover_in_doubt(
        ledger, to_send, report, reason=_AT_MOST_ONCE_REASON, what="approved action(s)", log=log
    )
    return report, {action: keys for action, keys in to_send.items() if keys}


def _refused_rows(
    ledger: ActionLedger, channel: Channel, keys: Sequence[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Reserved rows the channel refuses, with the reason: an escalation's entity data was never
    checked by the channel (only acted-on rows are, before routing sends them).

    Raises:
        ChannelConfigError: The channel itself is misconfigured (it refuses even no rows).
    """
    rows = ledger.approved_action_rows(keys)
    if not rows:
        return {}
    frame = pd.DataFrame([row["data"] for row in rows.values()], index=list(rows))
    # A misconfigured channel refuses an empty frame too: that is not the entities' fault.
    channel.validate_rows(frame.iloc[0:0])
    try:
        channel.validate_rows(frame)
        return {}
    except ChannelConfigError:
        pass
    refused: dict[str, tuple[str, dict[str, Any]]] = {}
    for key in frame.index:
        try:
            channel.validate_rows(frame.loc[[key]])
        except ChannelConfigError as exc:
            refused[str(key)] = (
                f"not sent: the channel refuses the entity's data: {exc}",
                rows[key],
            )
    return refused


def _escalate_refused(
    ledger: ActionLedger, refused: Mapping[str, tuple[str, Mapping[str, Any]]]
) -> list[str]:
    """Refused rows go back to a person, unsent, with the channel's reason."""
    escalated: list[str] = []
    by_reason: dict[str, list[str]] = {}
    for key, (reason, _row) in refused.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        escalated += ledger.escalate_actions(
            keys,
            kind="delivery_failed",
            reason=reason,
            context={key: escalation_context_of(refused[key][1]) for key in keys},
            from_states=(RESERVED,),
        )
    return escalated
