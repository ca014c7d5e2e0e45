"""The workflow sensor: one run of the execution job per partition whose workflows have due work.

Workflow instances wait in the ledger, not in a process. ``<playbook>_workflows_sensor`` asks the
ledger, with one indexed query (:meth:`~autoexec_dagster.ActionLedger.due_partitions`), which
partitions hold instances whose wait or poll interval has passed, and requests one run of the
partition's execution job for each. That run re-materializes the partition's execution assets:
``execute_plan`` finds every entity already recorded (nothing is sent twice) and advances the
partition's workflows as far as they go now, so the partition's history shows them progressing.

The run key names the due batch, ``<playbook>:workflows:<partition>:<earliest due>``: a tick
evaluated twice requests nothing new, and once the run has moved the instances, their next due
time names the next batch. Partitions with a run of the job in flight are left to that run. A
run that failed without moving its batch would leave the same run key forever, so the batch is
requested again with a retry suffix, at most :data:`MAX_RETRIES` times.

The same sensor wakes partitions whose escalations a person approved: approved proposed actions
wait in the outbox until a run of their partition delivers them, and an approval is a batch of its
own (``<playbook>:approved:<partition>:<latest approval>``). A playbook whose rules propose
actions but that has no workflows gets the sensor as ``<playbook>_approved_actions_sensor``.

Like the insight sensor it never acts, and it skips with who paused and why while the playbook is
paused.
"""

from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import dagster as dg

from autoexec_dagster.dagster.execution_assets import ExecutionSetup
from autoexec_dagster.errors import AutoexecError
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook, proposes_actions

WORKFLOW_BATCH_TAG = "autoexec/workflow_batch"
TRIGGER_TAG = "autoexec/trigger"
# A batch whose runs keep failing (a broken channel, a bad deployment) is not requested forever.
MAX_RETRIES = 3
# Most run requests in one tick; the rest are due still and are requested by the next tick.
MAX_REQUESTS_PER_TICK = 200
_FAILED_RUNS_LOOKBACK = 1_000

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

_IN_FLIGHT = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def workflow_sensor_name(playbook: str) -> str:
    """``<playbook>_workflows_sensor``."""
    return f"{playbook}_workflows_sensor"


def due_work_sensor_name(playbook: Playbook) -> str:
    """The sensor's name: ``<playbook>_workflows_sensor``, or, for a playbook without workflows
    whose escalations propose actions, ``<playbook>_approved_actions_sensor``."""
    if playbook.workflows:
        return workflow_sensor_name(playbook.name)
    return f"{playbook.name}_approved_actions_sensor"


def _due_work(book: ActionLedger, playbook: Playbook) -> list[tuple[str, int, str]]:
    """``(partition, count, batch)`` per partition with due workflow work or approved actions."""
    found: dict[str, tuple[int, list[str]]] = {}
    if playbook.workflows:
        for partition, count, earliest in book.due_partitions(playbook=playbook.name):
            batch = due_batch(
                playbook=playbook.name, partition_key=partition, earliest_due=earliest
            )
            found[partition] = (count, [batch])
    if proposes_actions(playbook):
        for due in book.escalation_action_batches(playbook=playbook.name):
            batch = (
                f"{playbook.name}:approved:{due.partition_key or '-'}:"
                f"{as_utc(due.newest).isoformat()}"
            )
            count, batches = found.get(due.partition_key, (0, []))
            found[due.partition_key] = (count + due.count, [*batches, batch])
    return [(p, n, "+".join(b)) for p, (n, b) in sorted(found.items())]


def as_utc(moment: datetime) -> datetime:
    """An aware UTC time (SQLite hands stored times back without their offset)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def due_batch(*, playbook: str, partition_key: str, earliest_due: datetime) -> str:
    """The name of a partition's due batch: playbook, partition and its earliest due time."""
    return f"{playbook}:workflows:{partition_key or '-'}:{as_utc(earliest_due).isoformat()}"


def build_workflow_sensor(
    *,
    setup: ExecutionSetup,
    job: "UnresolvedAssetJobDefinition",
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds: int = 30,
    max_requests_per_tick: int = MAX_REQUESTS_PER_TICK,
    max_retries: int = MAX_RETRIES,
) -> dg.SensorDefinition:
    """The sensor ``<playbook>_workflows_sensor`` that requests a run per partition with due work.

    Args:
        setup: The execution setup (playbook and ledger handle, shared with the runs).
        job: The execution job to request.
        default_status: STOPPED unless the caller opts in: runs reach real destinations.
        minimum_interval_seconds: Least time between two ticks; a poll's ``every`` shorter than
            this is honoured only to the tick.
        max_requests_per_tick: Most partitions requested in one tick.
        max_retries: How often a batch whose run failed is requested again.

    Returns:
        The sensor definition.
    """
    playbook = setup.playbook
    name = playbook.name

    def failures_by_batch(context: dg.SensorEvaluationContext) -> Counter[str]:
        runs = context.instance.get_runs(
            dg.RunsFilter(
                job_name=job.name,
                statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED],
                tags={TRIGGER_TAG: "workflows"},
            ),
            limit=_FAILED_RUNS_LOOKBACK,
        )
        return Counter(run.tags.get(WORKFLOW_BATCH_TAG, "") for run in runs)

    def in_flight_partitions(context: dg.SensorEvaluationContext) -> set[str]:
        runs = context.instance.get_runs(
            dg.RunsFilter(job_name=job.name, statuses=_IN_FLIGHT), limit=_FAILED_RUNS_LOOKBACK
        )
        return {run.tags.get("dagster/partition", "") for run in runs}

    @dg.sensor(
        name=due_work_sensor_name(playbook),
        job=job,
        default_status=default_status,
        minimum_interval_seconds=minimum_interval_seconds,
        description=f"Requests one {job.name} run per partition whose workflow instances of "
        f"playbook {name!r} are due (a wait or a poll interval passed, a decision arrived) or "
        "whose escalations a person approved; the run advances or delivers them. Skips, with "
        "who paused and why, while the playbook is paused. Never acts itself.",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        try:
            book = setup.ledger.get()
            paused = book.pause_state(name)
            due = [] if paused is not None else _due_work(book, playbook)
        except AutoexecError as exc:
            return dg.SensorResult(skip_reason=f"{name}: cannot read the action ledger ({exc})")
        if paused is not None:
            scope, by, reason = paused
            target = "every playbook" if scope == "*" else f"playbook {scope!r}"
            return dg.SensorResult(
                skip_reason=f"{target} is paused by {by or 'unknown'}: {reason or 'no reason'}; "
                f"workflows are not advanced (`autoexec resume --playbook {name}` lifts it)"
            )
        if not due:
            upcoming = book.next_due(playbook=name) if playbook.workflows else None
            when = (
                f"next due at {as_utc(upcoming).isoformat()}"
                if upcoming is not None
                else "no workflow instance is active"
            )
            return dg.SensorResult(
                skip_reason=f"{name}: no workflow work or approved action is due; {when}"
            )
        busy = in_flight_partitions(context)
        failures = failures_by_batch(context)
        requests: list[dg.RunRequest] = []
        waiting_on_runs: list[str] = []
        given_up: list[str] = []
        for partition, count, batch in due:
            if partition in busy:
                waiting_on_runs.append(partition or "-")
                continue
            retries = failures.get(batch, 0)
            if retries > max_retries:
                given_up.append(partition or "-")
                continue
            if len(requests) >= max_requests_per_tick:
                break
            requests.append(
                dg.RunRequest(
                    run_key=batch if not retries else f"{batch}:retry{retries}",
                    partition_key=partition or None,
                    tags={
                        "autoexec/playbook": name,
                        TRIGGER_TAG: "workflows",
                        WORKFLOW_BATCH_TAG: batch,
                        "autoexec/workflows_due": str(count),
                    },
                )
            )
        if given_up:
            context.log.warning(
                f"{name}: the advance runs of {len(given_up)} partition(s) failed "
                f"{max_retries + 1} times for the same due batch; not requested again until "
                f"their due work changes: {', '.join(given_up[:5])} (see the failed runs)"
            )
        if not requests:
            parts = []
            if waiting_on_runs:
                parts.append(f"{len(waiting_on_runs)} partition(s) have a run in flight")
            if given_up:
                parts.append(f"{len(given_up)} partition(s) whose runs kept failing")
            return dg.SensorResult(
                skip_reason=f"{name}: workflow work is due, but {' and '.join(parts)}"
            )
        context.log.info(
            f"{name}: requesting {len(requests)} run(s) to advance due workflows: "
            + ", ".join(r.partition_key or "-" for r in requests[:5])
            + (f" and {len(requests) - 5} more" if len(requests) > 5 else "")
        )
        return dg.SensorResult(run_requests=requests)

    return _sensor
