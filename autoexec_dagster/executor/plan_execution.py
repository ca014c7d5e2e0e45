"""``execute_plan``: execute a routed plan through its channels, with the ledger as the outbox.

Order of work, so that bad input causes no side effect and nothing is lost:

1. Re-key and check the plan; every action has a channel; every channel accepts its rows.
2. The kill switch and the guardrails (blast radius, max actions): a blocked batch is escalated
   as a whole and nothing is sent.
3. Every entity is recorded (escalations, holdouts, skips final; actions ``reserved`` with their
   request data), in chunks (:mod:`~autoexec_dagster.executor.recording`).
4. Actions left in doubt by a crashed worker are recovered.
5. The delivery engine claims, sends and completes the reserved actions from the ledger
   (:mod:`~autoexec_dagster.executor.delivery`).

Steps 1-4 do blocking ledger I/O and run in a worker thread, so the event loop of the caller of
:func:`execute_plan_async` stays responsive throughout.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.channels.base import Channel
from autoexec_dagster.errors import PlanError
from autoexec_dagster.executor.delivery import DeliveryEngine, Progress
from autoexec_dagster.executor.escalation_actions import deliver_approved_escalations_async
from autoexec_dagster.executor.guardrails import (
    cooldown_lookup,
    escalate_batch,
    guardrail_violation,
)
from autoexec_dagster.executor.outside_loop import run_outside_loop
from autoexec_dagster.executor.recording import entity_data, record_plan
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.experiments.experiment import Experiment
from autoexec_dagster.experiments.variant_channel import with_variants
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.experiment_store import ExperimentState
from autoexec_dagster.playbook import (
    Playbook,
    experiments_by_action,
    measured_actions,
    proposes_actions,
)
from autoexec_dagster.routing import PLAN_ATTRS, rekey
from autoexec_dagster.workflows.advance import (
    WorkflowReport,
    advance_workflows_async,
    check_workflow_channels,
    check_workflow_columns,
)

__all__ = ["Progress", "escalate_batch", "execute_plan", "execute_plan_async"]

logger = logging.getLogger("autoexec_dagster")
_AT_MOST_ONCE_REASON = "in doubt after a crash; at-most-once action not resent, please reconcile"


def execute_plan(
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    insight_name: str | None = None,
    run_id: str | None = None,
    dry_run: bool | None = None,
    lease_seconds: float = 60.0,
    progress_interval_seconds: float = 5.0,
    on_progress: Callable[[Progress], None] | None = None,
    log: logging.Logger | Any | None = None,
    approval_links: ApprovalLinks | None = None,
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
        insight_name: The insight asset key; defaults to the one given to ``route`` (the same
            argument name as there).
        run_id: Recorded with each action (the Dagster run id, for lineage).
        dry_run: Record what would be sent and send nothing; defaults to the playbook's guardrail.
        lease_seconds: How long a claim holds without a heartbeat before another worker may
            treat it as abandoned.
        progress_interval_seconds: How often progress is logged on long batches.
        on_progress: Called with a :class:`Progress` at the same interval.
        log: Logger (a ``logging.Logger`` or Dagster's ``context.log``).
        approval_links: Signed-link settings for the approval notifications of the workflows
            this partition starts (see :func:`~autoexec_dagster.advance_workflows`).

    Returns:
        The :class:`ExecutionReport`.

    Raises:
        PlanError: An action has no channel, or the plan does not belong to this playbook.
        ChannelConfigError: A channel refuses a row (invalid address, host not allowed, ...).
        LedgerError: The ledger cannot be written.
    """
    return run_outside_loop(
        execute_plan_async(
            plan,
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=partition_key,
            insight_name=insight_name,
            run_id=run_id,
            dry_run=dry_run,
            lease_seconds=lease_seconds,
            progress_interval_seconds=progress_interval_seconds,
            on_progress=on_progress,
            log=log,
            approval_links=approval_links,
        ),
        name="execute_plan",
    )


async def execute_plan_async(
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    insight_name: str | None = None,
    run_id: str | None = None,
    dry_run: bool | None = None,
    lease_seconds: float = 60.0,
    progress_interval_seconds: float = 5.0,
    on_progress: Callable[[Progress], None] | None = None,
    log: logging.Logger | Any | None = None,
    approval_links: ApprovalLinks | None = None,
) -> ExecutionReport:
    """Async form of :func:`execute_plan`, with the same arguments and behaviour."""
    started = time.perf_counter()
    if not isinstance(plan, pd.DataFrame):
        raise PlanError(f"the plan must be a DataFrame from route(), got {type(plan).__name__}")
    out = log or logger
    # Before anything is recorded: a variant overriding a field its channel lacks is refused.
    channels = with_variants(channels, experiments_by_action(playbook))
    prepared = await asyncio.to_thread(
        prepare_plan,
        plan,
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        partition_key=partition_key,
        insight_name=insight_name,
        run_id=run_id,
        dry_run=dry_run,
        log=out,
    )
    report, to_send = prepared
    if to_send:
        engine = DeliveryEngine(
            ledger=ledger,
            channels=channels,
            report=report,
            playbook=playbook.name,
            partition_key=report.partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            progress_interval=progress_interval_seconds,
            on_progress=on_progress,
            log=out,
        )
        await engine.run(to_send)
    if proposes_actions(playbook) and not report.dry_run and not report.paused_reason:
        # Proposed actions people approved from the escalation queue since the last run.
        report.approved_actions = await deliver_approved_escalations_async(
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=report.partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            log=out,
        )
    if playbook.workflows and not report.dry_run and not report.blocked_reason:
        # Take the workflows this partition started (and any due ones) as far as they go now.
        report.workflows = await advance_workflows_async(
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=report.partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            log=out,
            approval_links=approval_links,
            report=WorkflowReport(
                playbook=playbook.name,
                partition_key=report.partition_key,
                started=report.workflows_started,
            ),
        )
    report.duration_seconds = time.perf_counter() - started
    if (report.blocked_reason is None and report.paused_reason is None) or to_send:
        out.info(
            f"{playbook.name} [{report.partition_key}]: {report.succeeded:,} succeeded, "
            f"{report.failed:,} failed, {report.escalated:,} escalated, {report.held_out:,} held "
            f"out, {report.skipped:,} skipped, {report.already_done:,} already done in "
            f"{report.duration_seconds:.2f} s"
        )
    return report


def prepare_plan(
    plan: pd.DataFrame,
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None,
    insight_name: str | None,
    run_id: str | None,
    dry_run: bool | None,
    log: Any,
) -> tuple[ExecutionReport, dict[str, list[str]]]:
    """Steps 1-4: check, guard, record and recover; returns the report and the keys to send."""
    attrs = plan.attrs.get(PLAN_ATTRS) or {}
    partition = partition_key if partition_key is not None else (attrs.get("partition_key") or "")
    keyed = rekey(plan, playbook=playbook, partition_key=partition, insight_name=insight_name)
    info = keyed.attrs[PLAN_ATTRS]
    dry = playbook.guardrails.dry_run if dry_run is None else dry_run
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
    check_workflow_channels(playbook, channels)
    check_workflow_columns(playbook, channels, keyed)

    paused = ledger.pause_reason(playbook.name)
    if paused:
        report.paused_reason = paused
        report.pending = len(act_positions)
        log.warning(f"{playbook.name} [{partition}]: not executed, {paused}")
        return report, {}

    blocked = guardrail_violation(
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
        log.warning(f"{playbook.name} [{partition}]: batch blocked, {blocked}")
        return report, {}

    cooldown = cooldown_lookup(keyed, playbook=playbook, ledger=ledger, partition_key=partition)
    starts = {
        rule.name: (rule.workflow, playbook.workflows[rule.workflow])
        for rule in playbook.rules
        if rule.workflow is not None
    }
    to_send = record_plan(
        ledger,
        keyed,
        report,
        channels=channels,
        run_id=run_id,
        dry=dry,
        cooldown=cooldown,
        starts=starts,
        experiments={} if dry else _start_experiments(ledger, playbook, keyed, act_positions),
        measured=measured_actions(playbook),
        budgets=playbook.guardrails.budgets,
    )
    if report.already_done:
        versions = ledger.partition_versions(playbook=playbook.name, partition_key=partition)
        report.earlier_versions = {
            v: n for v, n in versions.items() if v != report.playbook_version
        }
    if not dry and to_send:
        _recover(ledger, keyed, report, to_send, info=info, log=log)
    return report, to_send


def _start_experiments(
    ledger: ActionLedger, playbook: Playbook, keyed: pd.DataFrame, act_positions: np.ndarray
) -> dict[str, tuple[Experiment, ExperimentState]]:
    """Rule name -> experiment and ledger state, for the experiments this plan's actions reach
    (started in the ledger the first time)."""
    rules = {r.name: r for r in playbook.rules if r.experiment is not None}
    if not rules or not len(act_positions):
        return {}
    acting = set(keyed["rule"].iloc[act_positions].astype(str).unique())
    out: dict[str, tuple[Experiment, ExperimentState]] = {}
    for name in sorted(acting & set(rules)):
        rule = rules[name]
        assert rule.experiment is not None and rule.action is not None
        state = ledger.start_experiment(
            playbook=playbook.name, experiment=rule.experiment, rule=name, action=rule.action
        )
        out[name] = (rule.experiment, state)
    return out


def _recover(
    ledger: ActionLedger,
    keyed: pd.DataFrame,
    report: ExecutionReport,
    to_send: dict[str, list[str]],
    *,
    info: Mapping[str, Any],
    log: Any,
) -> None:
    """Actions a crashed worker left in doubt: resend at-least-once, escalate at-most-once."""
    pending = [key for keys in to_send.values() for key in keys]
    recovered = ledger.recover(pending)
    if not recovered:
        return
    report.in_doubt_recovered = len(recovered)
    at_most_once = [k for k, mode in recovered.items() if mode == "at_most_once"]
    if at_most_once:
        rows = keyed[keyed["idempotency_key"].isin(at_most_once)]
        context = {
            str(record["idempotency_key"]): {
                "playbook": info["playbook"],
                "playbook_version": info["playbook_version"],
                "insight": info["insight"],
                "partition_key": info["partition_key"],
                "entity_id": str(record["entity_id"]),
                "rule": str(record["rule"]),
                "data": entity_data(record),
            }
            for record in rows.to_dict("records")
        }
        escalated = ledger.escalate_actions(
            at_most_once, kind="in_doubt", reason=_AT_MOST_ONCE_REASON, context=context
        )
        report.escalated += len(escalated)
        report.note_escalation(_AT_MOST_ONCE_REASON, len(escalated))
        gone = set(escalated)
        for action, keys in to_send.items():
            to_send[action] = [k for k in keys if k not in gone]
    log.warning(
        f"{info['playbook']} [{info['partition_key']}]: {len(recovered)} action(s) were in doubt "
        f"after a crash; {len(recovered) - len(at_most_once)} are resent with the same key"
    )


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
