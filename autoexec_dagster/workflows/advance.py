"""``advance_workflows``: take every due workflow instance as far as it can go now, then stop.

A run claims the instances that are due (by the ledger's clock), groups them by the step they are
at, and moves each group one step per round, vectorised: ``when`` and ``until`` are evaluated over
the whole group at once. Action and poll steps are delivered through the same claim -> send ->
complete engine as one-shot actions, each attempt with its own key (instance, step, attempt), so a
crashed or re-run advance resumes where it stopped and never repeats a step that succeeded. An
instance that must wait (a poll interval, a timer) records when it is next due and is released; no
process or thread waits for it.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.channels.base import Channel
from autoexec_dagster.errors import PlanError, PlaybookError
from autoexec_dagster.executor.delivery import DeliveryEngine, keep_leases, locked_call
from autoexec_dagster.executor.outside_loop import run_outside_loop
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.expressions import parse_expression
from autoexec_dagster.keys import step_keys
from autoexec_dagster.ledger import payload
from autoexec_dagster.ledger.action_ledger import ActionLedger, new_worker_id
from autoexec_dagster.ledger.schema import (
    FAILED,
    FAILING,
    FINAL_STATES,
    IN_DOUBT,
    REJECTED,
    RESERVED,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    WAITING,
)
from autoexec_dagster.playbook import Playbook
from autoexec_dagster.workflows.approval_gate import ApprovalGate
from autoexec_dagster.workflows.instance import Instance, aware
from autoexec_dagster.workflows.report import WorkflowReport
from autoexec_dagster.workflows.transform_step import run_transform, transform_frame
from autoexec_dagster.workflows.workflow import Step, Workflow

logger = logging.getLogger("autoexec_dagster")

BATCH = 5_000
# Rounds per batch: each moves every instance at most one step. A workflow longer than this
# simply continues in the next batch of the same call.
_MAX_ROUNDS = 64
# An instance whose step attempt is held by another live worker is looked at again after this.
_HELD_RETRY = timedelta(seconds=30)


def advance_workflows(
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    run_id: str | None = None,
    lease_seconds: float = 60.0,
    max_instances: int | None = None,
    log: logging.Logger | Any | None = None,
    approval_links: ApprovalLinks | None = None,
    shares: int = 1,
) -> WorkflowReport:
    """Advance every due workflow instance of a playbook as far as it can go now.

    Call it from a sensor-requested run, a schedule or a loop; it returns when no claimed instance
    can move further now (each is finished, or waiting in the ledger until it is next due).

    Args:
        playbook: The playbook whose workflows to advance.
        ledger: The action ledger; its ``clock`` decides what is due.
        channels: Channel per action name, for every step's action.
        partition_key: Advance only this partition's instances (None: every partition).
        run_id: Recorded with every step attempt (the Dagster run id, for lineage).
        lease_seconds: How long a claim on an instance or a step holds without being saved.
        max_instances: Stop after claiming this many instances (None: all that are due).
        log: Logger (a ``logging.Logger`` or Dagster's ``context.log``).
        approval_links: Where ``autoexec serve`` listens and the secret its links are signed
            with; approval notifications then carry signed approve and reject links (None: the
            notifications name the request for the command line only).
        shares: How many workers advance the partition's workflows at once (the shards of a
            sharded execution): each claims its own instances, and the step channels' limits
            are divided among them.

    Returns:
        The :class:`WorkflowReport`.

    Raises:
        PlanError: A step's action or notify channel has no channel, or a transform step's
            function returned something it may not (the instances are left as they were).
        LedgerError: The ledger cannot be read or written.
    """
    return run_outside_loop(
        advance_workflows_async(
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=partition_key,
            run_id=run_id,
            lease_seconds=lease_seconds,
            max_instances=max_instances,
            log=log,
            approval_links=approval_links,
            shares=shares,
        ),
        name="advance_workflows",
    )


async def advance_workflows_async(
    *,
    playbook: Playbook,
    ledger: ActionLedger,
    channels: Mapping[str, Channel],
    partition_key: str | None = None,
    run_id: str | None = None,
    lease_seconds: float = 60.0,
    max_instances: int | None = None,
    log: logging.Logger | Any | None = None,
    report: WorkflowReport | None = None,
    approval_links: ApprovalLinks | None = None,
    shares: int = 1,
) -> WorkflowReport:
    """Async form of :func:`advance_workflows`, with the same arguments and behaviour."""
    started = time.perf_counter()
    check_workflow_channels(playbook, channels)
    out = log or logger
    report = report or WorkflowReport(playbook=playbook.name, partition_key=partition_key)
    if not playbook.workflows:
        return report
    paused = await asyncio.to_thread(ledger.pause_reason, playbook.name)
    if paused:
        out.warning(f"{playbook.name}: workflows not advanced, {paused}")
        return report
    advancer = _Advancer(
        playbook=playbook,
        ledger=ledger,
        channels=channels,
        report=report,
        run_id=run_id,
        lease_seconds=lease_seconds,
        log=out,
        links=approval_links,
        shares=shares,
    )
    seen: set[str] = set()
    while max_instances is None or len(seen) < max_instances:
        limit = BATCH if max_instances is None else min(BATCH, max_instances - len(seen))
        claimed = await asyncio.to_thread(
            ledger.claim_instances,
            playbook=playbook.name,
            worker=advancer.worker,
            lease_seconds=lease_seconds,
            partition_key=partition_key,
            limit=limit,
        )
        fresh = [row for row in claimed if row["instance_id"] not in seen]
        again = [row["instance_id"] for row in claimed if row["instance_id"] in seen]
        if again:
            # Due again within this call (held by another worker): leave them to a later run.
            await asyncio.to_thread(ledger.release_instances, again, worker=advancer.worker)
        if not fresh:
            break
        seen.update(row["instance_id"] for row in fresh)
        await advancer.advance([Instance.from_row(row) for row in fresh])
    report.duration_seconds += time.perf_counter() - started
    if report.advanced:
        out.info(
            f"{playbook.name} workflows [{partition_key or 'all partitions'}]: "
            f"{report.advanced:,} advanced, {report.steps_delivered:,} steps delivered, "
            f"{report.succeeded:,} succeeded, {report.failed:,} failed, {report.waiting:,} waiting"
            + (f" (next due {report.next_due:%Y-%m-%d %H:%M:%S} UTC)" if report.next_due else "")
        )
    return report


def check_workflow_channels(playbook: Playbook, channels: Mapping[str, Channel]) -> None:
    """Every step's action has a channel.

    Raises:
        PlanError: Naming each step whose action has no channel.
    """
    missing = [
        f"{channel!r} (workflow {name!r}, step {step.name!r})"
        for name, workflow in playbook.workflows.items()
        for step in [*workflow.steps, *workflow.on_failure_steps]
        for channel in (step.action, step.notify)
        if channel is not None and channel not in channels
    ]
    if missing:
        raise PlanError(
            f"no channel for step action(s) {'; '.join(missing)}; channels given: "
            f"{sorted(channels) or 'none'}"
        )


# What a step's request carries besides the entity's insight columns (see _Advancer._reserve).
STEP_REQUEST_FIELDS = frozenset({"entity_id", "workflow", "step", "attempt", "steps"})


def check_workflow_columns(
    playbook: Playbook, channels: Mapping[str, Channel], plan: pd.DataFrame
) -> None:
    """Every column a step's channel reads is in the plan rows that start its workflow.

    Checked before a workflow starts, so a step channel reading a column the insight lacks is
    refused with nothing recorded, instead of failing (and escalating) every instance at that
    step later. Approval notifications are left out: the gate builds their rows itself.

    Raises:
        PlanError: Naming the workflow, the step, its channel and the missing columns.
    """
    if plan.empty or "decision" not in plan.columns:
        return
    workflow_rows = plan["decision"].astype(str) == "workflow"
    if not workflow_rows.any():
        return
    started = set(plan.loc[workflow_rows, "rule"].astype(str))
    available = set(map(str, plan.columns)) | STEP_REQUEST_FIELDS
    problems = []
    for rule in playbook.rules:
        if rule.name not in started or rule.workflow is None:
            continue
        workflow = playbook.workflows[rule.workflow]
        for step in [*workflow.steps, *workflow.on_failure_steps]:
            channel = channels.get(step.action) if step.action is not None else None
            if channel is None:
                continue
            missing = sorted(channel.required_columns() - available)
            if missing:
                problems.append(
                    f"workflow {rule.workflow!r} step {step.name!r}: {type(channel).__name__} "
                    f"{step.action!r} reads column(s) {missing}, which the plan does not have"
                )
    if problems:
        raise PlanError("; ".join(problems) + f" (plan columns: {sorted(map(str, plan.columns))})")


class _Advancer:
    """Moves claimed instances step by step, one round per step, and saves them."""

    def __init__(
        self,
        *,
        playbook: Playbook,
        ledger: ActionLedger,
        channels: Mapping[str, Channel],
        report: WorkflowReport,
        run_id: str | None,
        lease_seconds: float,
        log: Any,
        links: ApprovalLinks | None = None,
        shares: int = 1,
    ):
        self.shares = shares
        self.playbook = playbook
        self.ledger = ledger
        self.channels = channels
        self.report = report
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self.log = log
        self.worker = new_worker_id()
        self._rows_lock = threading.Lock()
        self.links = links
        # Decided approval requests acted on since the last save (marked applied with it).
        self.applied_approvals: list[str] = []
        self._gate = ApprovalGate(self, send_notifications=self._send_notifications)

    def _steps(self, instance: Instance) -> list[Step]:
        workflow = self.playbook.workflows[instance.workflow]
        return workflow.on_failure_steps if instance.state == FAILING else workflow.steps

    async def advance(self, instances: list[Instance]) -> None:
        """Move claimed instances as far as they go now and save them, keeping their lease."""
        beat = asyncio.create_task(
            keep_leases(
                self._rows_lock,
                self.ledger.heartbeat_instances,
                worker=self.worker,
                lease_seconds=self.lease_seconds,
            )
        )
        try:
            await self._advance(instances)
        except PlanError:
            # A transform that returned what it may not: leave every instance as it was (its
            # recorded step attempts are found again by key), so the fixed code resumes them.
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await asyncio.to_thread(
                self.ledger.release_instances,
                [i.instance_id for i in instances],
                worker=self.worker,
            )
            raise
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat  # a heartbeat failure that landed just now is raised, not dropped
        updates = sorted(
            (i.saved(self.playbook.workflows.get(i.workflow)) for i in instances),
            key=lambda u: u["instance_id"],
        )
        applied, self.applied_approvals = self.applied_approvals, []
        # Under the lock: a heartbeat already running in its thread finishes first (see
        # locked_call), so the two UPDATEs never lock the same rows at once.
        await asyncio.to_thread(
            locked_call,
            self._rows_lock,
            self.ledger.save_instances,
            updates,
            worker=self.worker,
            applied_approvals=applied,
        )
        for instance in instances:
            if instance.state == WAITING and instance.next_due is not None:
                self.report.waiting += 1
                if self.report.next_due is None or instance.next_due < self.report.next_due:
                    self.report.next_due = instance.next_due
            elif instance.state in (RUNNING, FAILING):
                self.report.running += 1

    async def _advance(self, instances: list[Instance]) -> None:
        self.report.advanced += len(instances)
        unknown = [i for i in instances if i.workflow not in self.playbook.workflows]
        for instance in unknown:
            # The playbook no longer defines the workflow this instance runs: a person decides.
            self._finish_failed(instance, f"workflow {instance.workflow!r} is no longer defined")
        for _ in range(_MAX_ROUNDS):
            now = self.ledger.clock()
            moving = [
                i
                for i in instances
                if not i.parked
                and i.state in (RUNNING, WAITING, FAILING)
                and (i.next_due is None or i.next_due <= now)
            ]
            if not moving:
                break
            await self._round(moving, now)
        escalations = [i for i in instances if i.state == FAILED and i.finished_at is not None]
        await asyncio.to_thread(self._escalate, escalations)

    async def _round(self, moving: list[Instance], now: datetime) -> None:
        groups: dict[tuple[str, str, int], list[Instance]] = {}
        for instance in moving:
            steps = self._steps(instance)
            if instance.step_index >= len(steps):
                self._end_of_steps(instance, now)
                continue
            groups.setdefault(
                (
                    instance.workflow,
                    (instance.state == FAILING and "f") or "m",
                    instance.step_index,
                ),
                [],
            ).append(instance)
        deliveries: list[tuple[Instance, Step]] = []
        gates: list[tuple[Step, list[Instance]]] = []
        for (_workflow, _phase, _index), members in groups.items():
            step = self._steps(members[0])[members[0].step_index]
            runnable = self._apply_when(step, members, now)
            if step.kind == "transform":
                # First, so a transform that must be refused stops the round before any send.
                if runnable:
                    self._transform(step, runnable, now)
                continue
            if step.kind == "approval":
                if runnable:
                    gates.append((step, runnable))
                continue
            for instance in runnable:
                if step.kind == "timer":
                    self._timer(step, instance, now)
                else:
                    deliveries.append((instance, step))
        for step, members in gates:
            await self._gate.advance(step, members, now)
        if deliveries:
            await self._deliver(deliveries, now)

    # -- transforms and approvals -------------------------------------------------------------

    def _transform(self, step: Step, members: list[Instance], now: datetime) -> None:
        frame = transform_frame(
            [self._frame_row(i) for i in members], [i.instance_id for i in members]
        )
        result = run_transform(step, frame)
        for instance in members:
            output = result.outputs.get(instance.instance_id)
            if output is None:
                reason = result.dropped.get(instance.instance_id, f"step {step.name!r}: no row")
                self._fail(instance, step, reason, now)
                continue
            instance.outputs[step.name] = output
            self._log(instance, step, SUCCEEDED, "transformed", now)
            self.report.count(step.name, "transformed")
            self._next_step(instance, now)

    def _reject(self, instance: Instance, step: Step, detail: str, now: datetime) -> None:
        self._log(instance, step, REJECTED, detail, now)
        instance.state = REJECTED
        instance.error = detail
        instance.finished_at = now
        instance.parked = True
        self.report.rejected += 1

    async def _send_notifications(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Reserve and deliver approver notifications; returns (delivered, failed)."""
        for row in rows:
            row["delivery"] = self.channels[row["action"]].delivery
        to_send = await asyncio.to_thread(self._reserve_rows, rows)
        if not to_send:
            return 0, 0
        engine = self._engine()
        await engine.run(to_send)
        return engine.report.succeeded, engine.report.failed

    # -- conditions ---------------------------------------------------------------------------

    @staticmethod
    def _frame_row(instance: Instance) -> dict[str, Any]:
        row = dict(instance.data)
        for step_name, output in instance.outputs.items():
            if isinstance(output, Mapping):
                for name, value in output.items():
                    row[f"{step_name}.{name}"] = value
        return row

    def _frame(self, members: Sequence[Instance]) -> pd.DataFrame:
        return pd.DataFrame([self._frame_row(i) for i in members])

    def _evaluate(
        self, step: Step, field_name: str, members: list[Instance]
    ) -> tuple[list[Instance], list[Instance]]:
        """(where the condition holds, where it does not); instances missing a field it reads
        fail with a message naming the field, and are in neither list."""
        source = getattr(step, field_name)
        parsed = parse_expression(source, rule=f"{step.name}.{field_name}")
        ok: list[Instance] = []
        for instance in members:
            missing = self._missing_fields(parsed.columns, instance)
            if missing:
                self._fail(
                    instance,
                    step,
                    f"step {step.name!r}: {field_name!r} reads {', '.join(missing)}, which "
                    f"the instance does not have",
                    self.ledger.clock(),
                )
            else:
                ok.append(instance)
        if not ok:
            return [], []
        frame = self._frame(ok)
        try:
            result = frame.eval(source, engine="python")
        except Exception as exc:
            for instance in ok:
                self._fail(
                    instance,
                    step,
                    f"step {step.name!r}: {field_name!r} failed to evaluate: {exc}",
                    self.ledger.clock(),
                )
            return [], []
        if isinstance(result, pd.Series):
            mask = result.fillna(False).astype(bool).tolist()
        else:
            mask = [bool(result)] * len(ok)
        holds = [i for i, m in zip(ok, mask, strict=True) if m]
        fails = [i for i, m in zip(ok, mask, strict=True) if not m]
        return holds, fails

    @staticmethod
    def _missing_fields(columns: frozenset[str], instance: Instance) -> list[str]:
        missing = []
        for column in sorted(columns):
            if column in instance.data:
                continue
            step_name, dot, name = column.partition(".")
            output = instance.outputs.get(step_name) if dot else None
            if not dot:
                missing.append(f"column {column!r}")
            elif not isinstance(output, Mapping):
                missing.append(f"{column!r} (step {step_name!r} has no output)")
            elif name not in output:
                missing.append(
                    f"{column!r} (the output of step {step_name!r} has no field {name!r}; it has "
                    f"{sorted(output)})"
                )
        return missing

    def _apply_when(self, step: Step, members: list[Instance], now: datetime) -> list[Instance]:
        if step.when is None:
            return members
        # A poll or timer in progress already passed its 'when'.
        started = [i for i in members if i.attempt > 0 or i.step_started_at is not None]
        fresh = [i for i in members if not (i.attempt > 0 or i.step_started_at is not None)]
        if not fresh:
            return started
        holds, fails = self._evaluate(step, "when", fresh)
        for instance in fails:
            self._log(instance, step, SKIPPED, "its 'when' did not hold", now)
            self.report.steps_skipped += 1
            self.report.count(step.name, "skipped")
            self._next_step(instance, now)
        return started + holds

    # -- timers -------------------------------------------------------------------------------

    def _timer(self, step: Step, instance: Instance, now: datetime) -> None:
        if instance.step_started_at is not None:
            self._log(instance, step, SUCCEEDED, "timer elapsed", now)
            self.report.count(step.name, "elapsed")
            self._next_step(instance, now)
            return
        if step.wait_until is not None:
            raw = instance.data.get(step.wait_until)
            due = aware(raw) if raw is not None else None
            if due is None:
                self._fail(
                    instance, step, f"step {step.name!r}: column {step.wait_until!r} is empty", now
                )
                return
        else:
            wait = step.wait_for
            assert wait is not None
            due = now + wait
        instance.step_started_at = now
        if due <= now:
            self._log(instance, step, SUCCEEDED, "timer already elapsed", now)
            self._next_step(instance, now)
            return
        self._wait(instance, due)
        self.report.count(step.name, "waiting")

    # -- actions and polls --------------------------------------------------------------------

    async def _deliver(self, deliveries: list[tuple[Instance, Step]], now: datetime) -> None:
        for instance, _step in deliveries:
            if instance.step_started_at is None:
                instance.step_started_at = now
            instance.attempt = max(instance.attempt, 1)
        by_step: dict[str, list[tuple[Instance, Step]]] = {}
        for instance, step in deliveries:
            by_step.setdefault(step.name, []).append((instance, step))
        keyed: list[tuple[Instance, Step, str]] = []
        for step_name, members in by_step.items():
            keys = step_keys(
                instance_ids=[i.instance_id for i, _ in members],
                step=step_name,
                attempts=[i.attempt for i, _ in members],
            )
            keyed.extend((i, s, k) for (i, s), k in zip(members, keys, strict=True))
        to_send = await asyncio.to_thread(self._reserve, keyed)
        if to_send:
            engine = self._engine()
            await engine.run(to_send)
            self.report.steps_delivered += engine.report.succeeded + engine.report.failed
        outcomes = await asyncio.to_thread(self.ledger.step_outcomes, [k for _, _, k in keyed])
        moment = self.ledger.clock()
        polled: dict[str, list[Instance]] = {}
        for instance, step, key in keyed:
            state, output, error = outcomes.get(key, (RESERVED, None, None))
            if state == SUCCEEDED:
                instance.outputs[step.name] = payload.loads(output) if output else {}
                self._log(instance, step, SUCCEEDED, f"attempt {instance.attempt}", moment)
                self.report.count(step.name, "delivered")
                if step.kind == "poll":
                    polled.setdefault(step.name, []).append(instance)
                else:
                    self._next_step(instance, moment)
            elif state in FINAL_STATES:
                # Named like every other step failure: a person must see which call failed.
                reason = (
                    f"step {step.name!r}: {error}" if error else f"step {step.name!r} ended {state}"
                )
                self._fail(instance, step, reason, moment)
            else:
                # Held by another live worker, or paused: look again later, repeat nothing.
                self._wait(instance, moment + _HELD_RETRY, state=instance.state)
                instance.parked = True
        for members in polled.values():
            step = self._steps(members[0])[members[0].step_index]
            self._until(step, members, moment)

    def _engine(self) -> DeliveryEngine:
        return DeliveryEngine(
            ledger=self.ledger,
            channels=self.channels,
            report=ExecutionReport(
                playbook=self.playbook.name,
                playbook_version=self.playbook.effective_version,
                insight="",
                partition_key="",
            ),
            playbook=self.playbook.name,
            partition_key=self.report.partition_key or "",
            run_id=self.run_id,
            lease_seconds=self.lease_seconds,
            progress_interval=5.0,
            on_progress=None,
            log=self.log,
            escalate_failures=False,
            shares=self.shares,
        )

    def _reserve(self, keyed: list[tuple[Instance, Step, str]]) -> dict[str, list[str]]:
        rows = []
        for instance, step, key in keyed:
            assert step.action is not None
            rows.append(
                {
                    "idempotency_key": key,
                    "playbook": self.playbook.name,
                    "playbook_version": instance.playbook_version,
                    "insight": instance.insight,
                    "partition_key": instance.partition_key,
                    "entity_id": instance.entity_id,
                    "rule": instance.rule,
                    "action": step.action,
                    "decision": "step",
                    "state": RESERVED,
                    "delivery": self.channels[step.action].delivery,
                    "run_id": self.run_id,
                    "instance_id": instance.instance_id,
                    "step": step.name,
                    "detail": None,
                    "data": {
                        **instance.data,
                        "entity_id": instance.entity_id,
                        "workflow": instance.workflow,
                        "step": step.name,
                        "attempt": instance.attempt,
                        "steps": instance.outputs,
                    },
                }
            )
        return self._reserve_rows(rows)

    def _reserve_rows(self, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
        """Reserve outbox rows (insert-ignore) and return the unfinished keys to send, by action.

        A row already final is not sent again; one a crash left in flight is recovered first
        (at-most-once rows are escalated, not resent).
        """
        self.ledger.reserve(rows)
        keys = [r["idempotency_key"] for r in rows]
        states = self.ledger.states(keys)
        unfinished = [k for k in keys if states.get(k, (RESERVED, None))[0] not in FINAL_STATES]
        recovered = self.ledger.recover(unfinished) if unfinished else {}
        at_most_once = [k for k, mode in recovered.items() if mode == "at_most_once"]
        if at_most_once:
            # Not resent: the step fails, and the workflow escalates with the evidence.
            self.ledger.escalate_actions(
                at_most_once,
                kind="in_doubt",
                reason="in doubt after a crash; at-most-once step not resent, please reconcile",
                context={},
                from_states=(IN_DOUBT,),
            )
        to_send: dict[str, list[str]] = {}
        gone = set(at_most_once)
        waiting = set(unfinished) - gone
        for row in rows:
            if row["idempotency_key"] in waiting:
                to_send.setdefault(row["action"], []).append(row["idempotency_key"])
        return to_send

    def _until(self, step: Step, members: list[Instance], now: datetime) -> None:
        holds, not_yet = self._evaluate(step, "until", members)
        for instance in holds:
            self._next_step(instance, now)
        timeout = step.poll_timeout
        assert timeout is not None
        for instance in not_yet:
            started = instance.step_started_at or now
            next_attempt = now + step.poll_every
            if next_attempt - started > timeout:
                last = instance.outputs.get(step.name)
                self._fail(
                    instance,
                    step,
                    f"step {step.name!r}: poll timed out after {instance.attempt} attempt(s) "
                    f"over {timeout}: {step.until} never held (last output: {last})",
                    now,
                )
                continue
            instance.attempt += 1
            self._wait(instance, next_attempt)
            self.report.count(step.name, "waiting")

    # -- moving on ----------------------------------------------------------------------------

    def _wait(self, instance: Instance, due: datetime, *, state: str = WAITING) -> None:
        instance.state = state if instance.state != FAILING else FAILING
        instance.next_due = due
        instance.parked = True

    def _next_step(self, instance: Instance, now: datetime) -> None:
        instance.step_index += 1
        instance.attempt = 0
        instance.step_started_at = None
        instance.next_due = now
        if instance.state == WAITING:
            instance.state = RUNNING
        if instance.step_index >= len(self._steps(instance)):
            self._end_of_steps(instance, now)

    def _end_of_steps(self, instance: Instance, now: datetime) -> None:
        if instance.state == FAILING:
            self._finish_failed(instance, instance.error or "the workflow failed")
            return
        instance.state = SUCCEEDED
        instance.finished_at = now
        instance.parked = True
        self.report.succeeded += 1

    def _fail(self, instance: Instance, step: Step, error: str, now: datetime) -> None:
        self._log(instance, step, FAILED, error, now)
        self.report.count(step.name, "failed")
        self.report.note_error(error)
        workflow = self.playbook.workflows[instance.workflow]
        if instance.state != FAILING and workflow.on_failure_steps:
            instance.state = FAILING
            instance.error = error
            instance.step_index = 0
            instance.attempt = 0
            instance.step_started_at = None
            instance.next_due = now
            return
        if instance.state != FAILING:
            instance.error = error
        self._finish_failed(instance, instance.error or error)

    def _finish_failed(self, instance: Instance, error: str) -> None:
        instance.state = FAILED
        instance.error = error
        instance.finished_at = self.ledger.clock()
        instance.parked = True
        self.report.failed += 1

    def _log(
        self, instance: Instance, step: Step, outcome: str, detail: str, now: datetime
    ) -> None:
        instance.log.append(
            {
                "step": step.name,
                "outcome": outcome,
                "attempt": instance.attempt,
                "at": now.isoformat(),
                "detail": detail[:500],
            }
        )

    def _escalate(self, failed: list[Instance]) -> None:
        if not failed:
            return
        rows = []
        for instance in failed:
            workflow = self.playbook.workflows.get(instance.workflow)
            reason = workflow.on_failure if workflow is not None else "The workflow failed"
            rows.append(
                {
                    "idempotency_key": instance.instance_id,
                    "playbook": self.playbook.name,
                    "playbook_version": instance.playbook_version,
                    "insight": instance.insight,
                    "partition_key": instance.partition_key,
                    "entity_id": instance.entity_id,
                    "rule": instance.rule,
                    "kind": "workflow_failed",
                    "reason": f"{reason}: {instance.error}" if instance.error else reason,
                    "data": {
                        **instance.data,
                        "workflow": instance.workflow,
                        "evidence": instance.log,
                        "outputs": instance.outputs,
                    },
                }
            )
        opened = self.ledger.open_escalations(rows)
        self.report.escalated += len(opened)


def workflow_of(playbook: Playbook, rule: str) -> Workflow:
    """The workflow a rule starts.

    Raises:
        PlaybookError: The rule starts no workflow.
    """
    name = playbook.rule(rule).workflow
    if name is None:
        raise PlaybookError(f"rule {rule!r} starts no workflow")
    return playbook.workflows[name]
